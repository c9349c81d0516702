"""Hugging Face hub revisions (`analyze --hf REPO@REVISION`) read from a local hub cache, and hub data
without network: one-line errors. No test touches the network."""

import pytest
import torch
from helpers import make_text

transformers = pytest.importorskip("transformers")

from dynascope.analysis.hub import PYTHIA_SCHEDULE, hf_checkpoints  # noqa: E402
from dynascope.cli import main  # noqa: E402
from dynascope.core.data import EOS, train_tokenizer  # noqa: E402
from dynascope.core.errors import DynascopeError  # noqa: E402
from dynascope.core.records import read_csv  # noqa: E402
from dynascope.core.runfiles import RunFiles  # noqa: E402


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, corpus_file):
    """An offline hub cache, in huggingface_hub's layout (refs/<revision> holds a commit hash whose files lie
    in snapshots/<hash>/), holding org/tiny at revisions step1 and step2 with different weights."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(iter([corpus_file.read_text()]), 320), eos_token=EOS)
    (repo / "refs").mkdir(parents=True)
    for i, revision in enumerate(["step1", "step2"]):
        commit = f"{i + 1:040x}"
        torch.manual_seed(i)
        config = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64)
        transformers.GPT2LMHeadModel(config).save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs" / revision).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import: patch the constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_analyze_reads_hub_revisions_from_the_cache(hub_cache, corpus_file, tmp_path):
    main(["analyze", "--hf", "org/tiny@step2", "org/tiny@step1", "--tokens_per_step", "1000", "--analyses", "basic",
          "--data", str(corpus_file), "--out", str(tmp_path / "out"), "--no_plot"])
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [(r["step"], r["label"], r["tokens_seen"]) for r in rows] == [(1, "step1", 1000), (2, "step2", 2000)]
    for row, commit in zip(rows, ("1", "2"), strict=True):  # each row measured that revision's weights
        model = transformers.AutoModelForCausalLM.from_pretrained(hub_cache / "snapshots" / commit.zfill(40))
        norm = model.lm_head.weight.norm(dim=-1).mean().item()
        assert row["basic/unembed_row_norm_mean"] == pytest.approx(norm, rel=1e-6)
    assert rows[0]["basic/unembed_row_norm_mean"] != rows[1]["basic/unembed_row_norm_mean"]
    assert rows[0]["basic/probe_loss"] != rows[1]["basic/probe_loss"]


def test_a_revision_missing_from_the_cache_is_named(hub_cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--hf", "org/tiny@step1", "org/tiny@step3", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "org/tiny@step3" in err and "not in the local Hugging Face cache" in err
    assert "hf download org/tiny --revision step3" in err


def test_hub_names_and_the_pythia_schedule():
    revisions = [c.revision for c in hf_checkpoints(["EleutherAI/pythia-160m@pythia-schedule"])]
    assert len(revisions) == len(PYTHIA_SCHEDULE) == 154
    assert revisions[:12] == ["step0"] + [f"step{2**k}" for k in range(10)] + ["step1000"]
    assert revisions[-1] == "step143000" and revisions.count("step2000") == 1
    with pytest.raises(DynascopeError, match="no-such-dir: no such directory"):
        hf_checkpoints(["no-such-dir"])
    with pytest.raises(DynascopeError, match="REPO_ID@REVISION"):
        hf_checkpoints(["pythia@step1"])


@pytest.mark.parametrize("fails", ["at load", "while streaming"])
def test_prepare_a_hub_dataset_without_network_is_one_line(tmp_path, monkeypatch, capsys, fails):
    import datasets

    if fails == "at load":  # the real datasets.load_dataset, offline
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    else:  # a stream that loses the network after its first document

        def load_dataset(*args, **kwargs):
            def rows():
                yield {"text": make_text(1)}
                raise ConnectionError("Couldn't reach 'org/corpus' on the Hub")

            return datasets.IterableDataset.from_generator(rows)

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = RunFiles(tmp_path).config
    config.write_text(f"data:\n  source: hf\n  hf_name: org/corpus\n  cache_dir: {tmp_path / 'cache'}\n")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--config", str(config)])
    err = capsys.readouterr().err  # after datasets' progress bars, one line
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("dynascope: error: data.hf_name 'org/corpus'") and "network" in err
