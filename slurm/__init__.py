"""The Slurm job templates, shipped in the wheel (`dynascope sweep --slurm` submits train.sbatch)."""
