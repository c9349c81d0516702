"""dynascope: pretrain small transformers and measure when interpretability phenomena emerge.

From a notebook:

    import dynascope
    frame = dynascope.measure(model, probe=tokens, analyses="sparsity,outliers")  # one row per step
    run = dynascope.load_run("runs/demo")  # run.metrics, run.summary, run.onsets

`model` is dynascope's `Transformer`, a transformers causal LM or a TransformerLens `HookedTransformer`
(or a dict of them by step). The command line is `dynascope --help`. The package's floors, bottom up:
`core` (model, data, run files), `analysis` (the analyses, pure torch), `outputs` (where records go),
`pages` (plots and HTML), `train` and `callbacks` (Lightning), then the commands.
"""

__all__ = ["__version__", "load_run", "measure"]


def __getattr__(name: str):
    """`measure`, `load_run` and `__version__`, imported on first use: `import dynascope` (and the CLI) stays fast
    (the version is a package-metadata lookup)."""
    if name in ("measure", "load_run", "Run"):
        from dynascope import notebook

        return getattr(notebook, name)
    if name == "__version__":
        from dynascope.core.version import __version__

        return __version__
    raise AttributeError(f"module 'dynascope' has no attribute {name!r}")
