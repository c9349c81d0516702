"""The README's "Writing an analysis" example, run as written: one file registers a working analysis."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from helpers import copy_run

from dynascope.analysis import REGISTRY, build
from dynascope.analysis.measure import measure
from dynascope.analysis.view import ModelShape, TransformerView
from dynascope.cli import main
from dynascope.core.model import ModelConfig, Transformer
from dynascope.core.runfiles import RunFiles

README = Path(__file__).parents[1] / "README.md"
CONFIG = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, vocab_size=50, context_length=12)


@pytest.fixture
def entropy(tmp_path):
    """The README's example analysis, registered (and unregistered afterwards)."""
    section = README.read_text().split("### Writing an analysis", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "entropy.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("readme_entropy", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield REGISTRY["entropy"]
    REGISTRY.pop("entropy", None)


def test_the_example_analysis_registers_measures_and_carries(entropy):
    (a,) = build("entropy", ModelShape.of(CONFIG))
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    values = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        view = TransformerView(Transformer(CONFIG).eval())
        logp = view.forward(tokens).log_softmax(-1)
        values.append(-(logp.exp() * logp).sum(-1).mean().item())
        record = measure(view, [a], tokens, step=seed, batch_size=3)
        assert record.values["entropy/mean"] == pytest.approx(values[-1], rel=1e-6)
    assert record.values["entropy/change"] == pytest.approx(values[1] - values[0], rel=1e-5)


def test_the_example_analysis_appears_on_the_report_and_compare_pages(entropy, tiny_run, tmp_path):
    run, other = copy_run(tiny_run, tmp_path / "a"), copy_run(tiny_run, tmp_path / "b")
    for directory in (run, other):
        main(["analyze", str(directory), "--analyses", "basic,entropy", "--no_plot"])
    main(["report", str(run)])
    page = (RunFiles(run).report / "index.html").read_text()
    assert "<h2>entropy</h2>" in page and "alt='entropy_0'" in page  # its section, with its headline curve
    main(["compare", str(run), str(other), "--out", str(tmp_path / "compare")])
    page = (tmp_path / "compare" / "index.html").read_text()
    assert "<h2>entropy</h2>" in page and (tmp_path / "compare" / "entropy.png").exists()

