"""Atomic writes are durable: the file and the rename are flushed to the disk, and every file of a run gets the
mode the user's umask gives (safetensors alone would make snapshots 0600)."""

import os
import stat

from helpers import tiny_args

from dynascope.cli import main
from dynascope.core import io
from dynascope.core.runfiles import RunFiles


def test_an_atomic_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    io.atomic_write_text(tmp_path / "summary.json", "{}")
    (written,) = [p for p in synced if p != str(tmp_path)]
    assert written.startswith(str(tmp_path / ".summary.json.tmp"))  # the file, before its rename
    assert synced.index(str(tmp_path)) > synced.index(written)  # then the folder that holds the rename
    assert (tmp_path / "summary.json").read_text() == "{}" and os.listdir(tmp_path) == ["summary.json"]


def test_every_file_of_a_run_follows_the_umask(tmp_path, corpus_file):
    old = os.umask(0o027)
    try:
        main(tiny_args(corpus_file, tmp_path / "run", 2))
    finally:
        os.umask(old)
    run = RunFiles(tmp_path / "run")
    modes = {}
    for root, _, names in os.walk(run.root):
        if "/wandb" in root:  # wandb's own files
            continue
        for name in names:
            modes.setdefault(oct(stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)), []).append(name)
    assert set(modes) == {"0o640"}, {m: names[:5] for m, names in modes.items()}
    assert any(n.endswith(".safetensors") for n in modes["0o640"]) and any(n.endswith(".ckpt") for n in modes["0o640"])
