"""Every bad input is a one-line error naming the file or option, with exit code 2, no traceback, and
nothing written: config values, data files, tokenizers, analysis options and each command's arguments."""

import json
import shutil

import pytest
from helpers import copy_run, tiny_args

from dynascope.cli import main
from dynascope.core.runfiles import RunFiles


def error_line(capsys, args: list[str]) -> str:
    """Run the command; it must exit with 2 and print exactly one error line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dynascope: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


FIT_OPTIONS = [  # (arguments, what the message must name)
    (["--trainer.max_steps", "-5"], "trainer.max_steps"),
    (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    (["--trainer.bogus_option", "1"], "bogus_option"),
    (["--model.arch.context_length", "0"], "model.arch.context_length"),
    (["--model.arch.n_layers", "0"], "model.arch.n_layers"),
    (["--model.arch.n_heads", "3"], "model.arch.d_model"),
    (["--model.arch.activation", "tanh"], "model.arch.activation"),
    (["--model.arch.norm", "batchnorm"], "model.arch.norm"),
    (["--model.lr", "-1"], "model.lr"),
    (["--model.warmup_steps", "-2"], "model.warmup_steps"),
    (["--model.betas", "[0.9, 1.5]"], "model.betas"),
    (["--data.batch_size", "0"], "data.batch_size"),
    (["--data.val_fraction", "1.5"], "data.val_fraction"),
    (["--data.vocab_size", "100"], "data.vocab_size"),
    (["--data.source", "web"], "data.source"),
    (["--data.source", "hf"], "data.hf_name"),
    (["--snapshots.every", "-1"], "snapshots.every"),
    (["--checkpoints.every_n_steps", "-3"], "checkpoints.every_n_steps"),
    (["--dynamics.analyses", "basic,nonsense"], "nonsense"),
    (["--dynamics.options", '{"regions": {"n_alphas": 5}}'], "dynamics.options.regions"),
    (["--dynamics.options", '{"nonsense": {}}'], "nonsense"),
    (["--dynamics.options", '{"sparsity": {"dead_source": "vibes"}}'], "dead_source"),
    (["--dynamics.probe_windows", "0"], "dynamics.probe_windows"),
    (["--model.arch.vocab_size", "64"], "model.arch.vocab_size=64"),
    (["--ckpt_path", "last"], "--ckpt_path last"),
]


@pytest.mark.parametrize("extra,named", FIT_OPTIONS, ids=[" ".join(a) for a, _ in FIT_OPTIONS])
def test_fit_option(extra, named, capsys, tmp_path, corpus_file):
    run = tmp_path / "run"
    assert named in error_line(capsys, tiny_args(corpus_file, run, 2, *extra))
    assert not RunFiles(run).manifest.exists() and not (RunFiles(run).config).exists()


def data_files(tmp_path, corpus_file) -> dict:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "short.txt").write_text("A cat sat on the mat.\n\nThe dog ran.\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "a document"}) + "\n")
    (tmp_path / "notes.md").write_text("# a title\n")
    (RunFiles(tmp_path).tokenizer).write_text('{"version": "1.0", "model": ')
    return {"missing": ([tmp_path / "nope.txt"], "nope.txt"), "empty": ([tmp_path / "empty.txt"], "contains no text"),
            "binary": ([tmp_path / "binary.txt"], "binary.txt"), "short": ([tmp_path / "short.txt"], "context_length"),
            "bad json line": ([tmp_path / "bad.jsonl"], "bad.jsonl"),
            "no text column": ([tmp_path / "other.jsonl"], "data.text_column"),
            "extension": ([tmp_path / "notes.md"], "notes.md"),
            "mixed kinds": ([corpus_file, tmp_path / "other.jsonl"], "mix file kinds")}


DATA_CASES = ["missing", "empty", "binary", "short", "bad json line", "no text column", "extension", "mixed kinds"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_file(case, capsys, tmp_path, corpus_file):
    paths, named = data_files(tmp_path, corpus_file)[case]
    args = tiny_args(corpus_file, tmp_path / "run", 2, "--data.paths", "[" + ",".join(map(str, paths)) + "]")
    assert named in error_line(capsys, args)
    assert not RunFiles(tmp_path / "run").manifest.exists()


@pytest.mark.parametrize("case", ["corrupt", "missing", "no end-of-document token"])
def test_tokenizer_file(case, capsys, tmp_path, corpus_file):
    from tokenizers import Tokenizer, models

    path = RunFiles(tmp_path).tokenizer
    if case == "corrupt":
        path.write_text('{"version": "1.0", "model": ')
    elif case == "no end-of-document token":
        Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(path))
    message = error_line(capsys, tiny_args(corpus_file, tmp_path / "run", 2, "--data.tokenizer", str(path)))
    assert str(path) in message or "<|endoftext|>" in message


@pytest.fixture
def run(tiny_run, tmp_path):
    return copy_run(tiny_run, tmp_path)


def corrupt(path, text: bytes = b"\x00\x01garbage"):
    path.write_bytes(text)
    return path


COMMANDS = [  # (case, arguments with RUN for the run directory, what the message must name)
    ("analyze steps not numbers", ["analyze", "RUN", "--steps", "4,x"], "--steps"),
    ("analyze steps not snapshots", ["analyze", "RUN", "--steps", "5,999"], "999"),
    ("analyze missing directory", ["analyze", "RUN/nope"], "nope"),
    ("analyze options not json", ["analyze", "RUN", "--options", "{bad"], "--options"),
    ("analyze unknown option", ["analyze", "RUN", "--options", '{"vocab": {"stride": 2}}'], "dynamics.options.vocab"),
    ("analyze unknown analysis", ["analyze", "RUN", "--analyses", "basic,nope"], "nope"),
    ("analyze hf without out", ["analyze", "--hf", "RUN"], "--out"),
    ("analyze unknown argument", ["analyze", "RUN", "--fast"], "--fast"),
    ("batch negative step", ["batch", "RUN", "--step", "-1"], "--step"),
    ("batch step beyond the run", ["batch", "RUN", "--step", "1000000"], "--step"),
    ("batch rank beyond the run", ["batch", "RUN", "--step", "1", "--rank", "3"], "--rank"),
    ("batch micro beyond accumulation", ["batch", "RUN", "--step", "1", "--micro", "2"], "--micro"),
    ("batch missing run", ["batch", "RUN/nope", "--step", "1"], "nope"),
    ("report missing directory", ["report", "RUN/nope"], "nope"),
    ("plot missing directory", ["plot", "RUN/nope"], "nope"),
    ("prepare missing config", ["prepare", "--config", "RUN/nope.yaml"], "nope.yaml"),
    ("unknown command", ["train", "RUN"], "'train'"),
]


@pytest.mark.parametrize("case,args,named", COMMANDS, ids=[c for c, _, _ in COMMANDS])
def test_command_argument(case, args, named, run, capsys):
    message = error_line(capsys, [a.replace("RUN", str(run)) for a in args])
    assert named in message


@pytest.mark.parametrize("text,named", [("model: [unclosed\n", "line 2"), ("- a list\n", "mapping")])
def test_prepare_on_a_bad_yaml(text, named, tmp_path, capsys):
    config = RunFiles(tmp_path).config
    config.write_text(text)
    message = error_line(capsys, ["prepare", "--config", str(config)])
    assert str(config) in message and named in message


BAD_FILES = [  # (file of the run, its bad content, what the message names besides the file)
    ("snapshots/manifest.jsonl", None, "line 3"),
    ("config.yaml", b"model: [unclosed\n", "line 2"),
    ("probe.safetensors", b"\x00\x01garbage", "probe set"),
    ("tokenizer.json", b'{"version": ', "tokenizer"),
]


@pytest.mark.parametrize("name,content,named", BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_analyze_names_a_bad_file_of_the_run(name, content, named, run, capsys):
    path = run / name
    if content is None:  # one garbage line in the middle of the manifest
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:2]) + "{garbage\n" + "".join(lines[2:]))
    else:
        corrupt(path, content)
    before = (RunFiles(run).analysis.metrics_csv).read_bytes()
    message = error_line(capsys, ["analyze", str(run)])
    assert str(path) in message and named in message
    assert (RunFiles(run).analysis.metrics_csv).read_bytes() == before  # nothing written


def test_analyze_into_an_unwritable_directory_fails_before_computing(run, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):  # root writes anywhere: a read-only file system refuses even root
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    shutil.rmtree(run / "analysis")
    message = error_line(capsys, ["analyze", str(run)])
    assert str(run / "analysis") in message and "not writable" in message
