import json

import numpy as np
import pytest
import torch

from dynascope.cli import main
from dynascope.core.data import Corpus, DataConfig, prepare_corpus, sample_batch
from dynascope.core.errors import DynascopeError
from dynascope.core.sources import embedded_documents, embedded_file


def test_prepare_corpus_writes_memmaps_counts_and_tokenizer(corpus_file, tmp_path):
    cfg = DataConfig(source="files", paths=[str(corpus_file)], vocab_size=320, val_fraction=0.2,
                     cache_dir=str(tmp_path))
    path = prepare_corpus(cfg)
    assert prepare_corpus(cfg) == path  # cached by config hash
    c = Corpus(path)
    train, val = c.tokens("train"), c.tokens("val")
    assert train.dtype == np.uint16 and c.meta["vocab_size"] <= 320
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.35  # document-level split near val_fraction
    counts = c.counts()
    assert counts.sum() == len(train) and np.array_equal(counts, np.bincount(train, minlength=len(counts)))
    n_docs = corpus_file.read_text().count("\n\n") + 1
    assert (train == c.meta["eos_id"]).sum() + (val == c.meta["eos_id"]).sum() == n_docs  # EOS between documents
    text = c.tokenizer().decode(train[:200].tolist())
    assert "." in text and any(w in text.lower() for w in ("the", "cat", "dog"))


def test_batches_are_a_pure_function_of_seed_step_rank_micro(corpus_file):
    cfg = DataConfig(source="files", paths=[str(corpus_file)], vocab_size=320)
    tokens = Corpus(prepare_corpus(cfg)).tokens("train")
    a = sample_batch(tokens, 4, 16, seed=1, step=7, rank=0, micro=0)
    b = sample_batch(tokens, 4, 16, seed=1, step=7, rank=0, micro=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1])  # targets are inputs shifted by one
    for other in ({"step": 8}, {"rank": 1}, {"micro": 1}, {"seed": 2}):
        args = {"seed": 1, "step": 7, "rank": 0, "micro": 0} | other
        assert not torch.equal(sample_batch(tokens, 4, 16, **args)[0], a[0]), other


def test_embedded_corpora_are_verified_and_parsed():
    assert embedded_file("wiki").name == "summaries_en-us.json"
    wiki = list(embedded_documents("wiki"))
    assert len(wiki) == 10033 and all(wiki)
    kjv = list(embedded_documents("kjv"))
    assert len(kjv) == 1189  # chapters of the King James Bible
    assert kjv[0].startswith("In the beginning God created the heaven") and "1:1" not in kjv[0]


def test_batch_command_prints_the_text_of_a_step(capsys, tmp_path, corpus_file):
    from helpers import tiny_args

    main(tiny_args(corpus_file, tmp_path / "run", 4, "--dynamics.analyses", "basic"))
    capsys.readouterr()
    main(["batch", str(tmp_path / "run"), "--step", "3"])
    out = capsys.readouterr().out
    cfg = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert cfg["trainer/global_step"] == 0
    c = Corpus(prepare_corpus(DataConfig(source="files", paths=[str(corpus_file)], vocab_size=320, val_fraction=0.2)))
    x, y = sample_batch(c.tokens("train"), 4, 32, seed=1234, step=3)
    first = c.tokenizer().decode(x[0].tolist() + [int(y[0, -1])], skip_special_tokens=False)
    assert out.count("--- window") == 4 and first in out


def test_hub_source_streams_a_dataset_by_name(tmp_path, corpus_file):
    """`source: hf` goes through `datasets.load_dataset(name, streaming=True)`; a local dataset
    directory stands in for a hub name here (no network)."""
    import json as js

    docs = corpus_file.read_text().split("\n\n")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(js.dumps({"content": d}) + "\n" for d in docs))
    cfg = DataConfig(source="hf", hf_name=str(tmp_path / "ds"), text_column="content", hf_max_docs=150,
                     vocab_size=320, cache_dir=str(tmp_path / "cache"))
    c = Corpus(prepare_corpus(cfg))
    assert c.meta["n_documents"] == 150
    with pytest.raises(DynascopeError, match="text_column 'body'"):
        prepare_corpus(DataConfig(source="hf", hf_name=str(tmp_path / "ds"), text_column="body",
                                  cache_dir=str(tmp_path / "c2")))


def test_every_fit_option_of_ours_is_documented(capsys):
    """`dynascope fit --help_all` gives each option of the model, data, snapshot, checkpoint and analysis groups
    a line of its own documentation, not only its type and default; the short `--help` names only real ones."""
    import re

    main(["fit", "--help"])
    short = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--help_all"])
    text = capsys.readouterr().out
    named = set(re.findall(r"--([a-z_]+(?:\.[a-z_]+)*)", short)) - {"help_all", "SECTION"}
    assert len(named) > 15 and all(f"--{n}" in text for n in named), sorted(n for n in named if f"--{n}" not in text)
    option = r"^  --((?:model|data|snapshots|checkpoints|dynamics)\.[\w.]+)(?: [\w{},]+)?"
    entries = re.findall(option + r"(.*\n(?:\s{20,}.*\n)*)", text, re.M)  # (name, help text up to the next option)
    names = {name for name, _ in entries}
    assert {"model.arch.d_mlp", "model.lr", "data.seed", "snapshots.log_cap", "dynamics.probe_seed",
            "checkpoints.every_n_steps"} <= names
    undocumented = [name for name, help_text in entries if " ".join(help_text.split()).startswith("(type:")]
    assert undocumented == []
