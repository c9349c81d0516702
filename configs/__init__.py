"""The presets, shipped in the wheel: `dynascope fit --config tiny-relu` finds them by name."""
