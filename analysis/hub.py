"""Hugging Face checkpoints to replay: local model directories, or hub revisions read through the local cache.

`hf_replay` builds the `Replay` of a list of them, ordered by their labels, with a probe set and corpus
counts drawn from the embedded corpus (or given files) with the model's own tokenizer, or the probe
windows and counts of one of our runs (`probe`, `counts`), so an exported run is measured as its snapshots
are.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dynascope.analysis.base import AnalysisContext
from dynascope.analysis.replay import Checkpoint, Replay, Source
from dynascope.analysis.view import HFModelView
from dynascope.core.data import Corpus, DataConfig, load_tokenizer, prepare_corpus
from dynascope.core.errors import DynascopeError, first_line
from dynascope.core.probe import load_counts, load_probe, sample_probe

PYTHIA_SCHEDULE = [0, *(2**k for k in range(10)), *range(1000, 143_001, 1000)]  # Pythia's 154 step branches


@dataclass(frozen=True)
class HFCheckpoint:
    """A local Hugging Face model directory (`revision` None), or a hub repo at a revision, read through the
    local Hugging Face cache (and downloaded into it unless offline)."""

    source: str
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"

    @property
    def label(self) -> str:
        """The default label: the revision (e.g. step1000), else the directory's name."""
        return Path(self.source).name if self.revision is None else self.revision

    @contextlib.contextmanager
    def _hub_errors(self, what: str) -> Iterator[None]:
        from huggingface_hub import constants, errors

        try:
            yield
        except errors.LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not cached
            raise DynascopeError(f"{self.name} ({what}) is not in the local Hugging Face cache "
                                 f"{constants.HF_HUB_CACHE}; download it first (hf download {self.source} --revision "
                                 f"{self.revision}), or run where the hub can be reached, with HF_HUB_OFFLINE unset"
                                 ) from None
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as e:
            raise DynascopeError(f"{self.name} ({what}): {first_line(e)}; check the repo id and revision") from None
        except OSError as e:  # transformers reports what it could not load as OSError
            raise DynascopeError(f"{self.name} ({what}) cannot be loaded ({first_line(e)})") from None

    def file(self, filename: str) -> Path:
        """The local path of one of the checkpoint's files (a hub file is fetched into the cache)."""
        if self.revision is None:
            path = Path(self.source) / filename
            if not path.is_file():
                raise DynascopeError(f"{self.source} has no {filename}; give a directory written by save_pretrained "
                                     "(of the model and of its fast tokenizer)")
            return path
        from huggingface_hub import hf_hub_download

        with self._hub_errors(filename):
            return Path(hf_hub_download(self.source, filename, revision=self.revision))

    def load(self) -> HFModelView:
        if self.revision is None:
            return HFModelView.from_dir(self.source)
        from transformers import AutoModelForCausalLM

        with self._hub_errors("weights"):
            model = AutoModelForCausalLM.from_pretrained(self.source, revision=self.revision, dtype=torch.float32)
        return HFModelView(model)


def hf_checkpoints(names: list[str]) -> list[HFCheckpoint]:
    """`--hf` arguments: local model directories, or hub checkpoints REPO@REVISION (REPO@pythia-schedule:
    Pythia's 154 branches step0 ... step143000)."""
    checkpoints = []
    for name in names:
        repo, at, revision = name.partition("@")
        if Path(name).is_dir():
            checkpoints.append(HFCheckpoint(name))
        elif not at:
            raise DynascopeError(f"--hf {name}: no such directory; a hub checkpoint is REPO_ID@REVISION, e.g. "
                                 "EleutherAI/pythia-160m@step1000")
        elif not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or not revision:
            raise DynascopeError(f"--hf {name}: a hub checkpoint is REPO_ID@REVISION, e.g. "
                                 "EleutherAI/pythia-160m@step1000 (or @pythia-schedule for all of Pythia's)")
        else:
            revisions = [f"step{s}" for s in PYTHIA_SCHEDULE] if revision == "pythia-schedule" else [revision]
            checkpoints += [HFCheckpoint(repo, r) for r in revisions]
    return checkpoints


def _hf_eos(tokenizer_config: Path) -> str:
    eos = json.loads(tokenizer_config.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not eos:
        raise DynascopeError(f"{tokenizer_config} names no eos_token; the corpus needs one between documents")
    return eos


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def labelled(checkpoints: list[HFCheckpoint], labels: list[str] | None) -> dict[str, HFCheckpoint]:
    """{label: checkpoint} in order: `labels` in their order, else the default labels in natural order."""
    if labels is not None and len(labels) != len(checkpoints):
        raise DynascopeError(f"--labels has {len(labels)} entries for {len(checkpoints)} checkpoints")
    pairs = list(zip(labels, checkpoints, strict=True)) if labels else sorted(
        ((c.label, c) for c in checkpoints), key=lambda p: _natural_key(p[0]))
    by_label = dict(pairs)
    if len(by_label) != len(pairs):
        raise DynascopeError("--hf: two checkpoints have the same label; give distinct --labels")
    return by_label


def step_of(position: int, label: str, given: bool) -> int:
    """A checkpoint's step: the last number of a `given` label, else a `stepN` label's N (Pythia's and OLMo's
    revisions, `dynascope export --all` directories), else its position."""
    digits, default = re.findall(r"\d+", label), re.match(r"step(\d+)", label)
    return int(digits[-1]) if digits and given else int(default[1]) if default else position


@dataclass
class ProbeSource:
    """Where a replay of Hugging Face checkpoints takes its probe windows and token counts: `windows` windows of
    `context_length` tokens (or the model's maximum, if shorter) and the counts, from `data` (default: the
    embedded corpus) tokenized with the model's own tokenizer; or a run's `probe` file and `counts`."""

    data: DataConfig | None = None
    windows: int = 64
    context_length: int = 128
    probe: str | Path | None = None
    counts: str | Path | None = None


def _probe_and_context(first: HFCheckpoint, source: ProbeSource) -> tuple[torch.Tensor, AnalysisContext]:
    """The probe windows and the analysis context of a model family, from its first checkpoint's tokenizer."""
    tokenizer_file, eos = first.file("tokenizer.json"), _hf_eos(first.file("tokenizer_config.json"))
    config = first.file("config.json")  # the model's limits, without loading its weights
    probe, counts, corpus = source.probe, source.counts, None
    if probe is None or counts is None:
        data = source.data or DataConfig()
        data.tokenizer, data.eos_token = str(tokenizer_file), eos
        corpus = Corpus(prepare_corpus(data))
    max_positions = HFModelView.max_positions(config.parent)
    tokens = load_probe(probe) if probe else sample_probe(corpus.tokens("val"), source.windows,
                                                          min(source.context_length, max_positions))
    vocab = json.loads(config.read_text()).get("vocab_size")
    if tokens.shape[1] > max_positions or (vocab and tokens.max() >= vocab):
        raise DynascopeError(f"{f'--probe {probe}' if probe else 'the probe set'}: windows of {tokens.shape[1]} "
                             f"tokens with ids up to {int(tokens.max())} do not fit {first.name} ({max_positions} "
                             f"positions, {vocab} tokens); give a probe set of this model's tokenizer")
    tokenizer = load_tokenizer(tokenizer_file)
    token_counts = load_counts(counts, "--counts") if counts else corpus.counts()
    return tokens, AnalysisContext(torch.from_numpy(token_counts), tokenizer, tokenizer.token_to_id(eos))


def hf_source(model_dirs: list[str | Path], labels: list[str] | None = None,
              tokens_per_step: int | None = None) -> tuple[Source, HFCheckpoint]:
    """Hugging Face checkpoints (local directories or hub revisions, see `hf_checkpoints`) ordered by `labels` (a
    step number in each label, e.g. `step3000`, becomes the x-axis; otherwise the position) or else by revision
    or directory name, and the first of them. `tokens_per_step` gives tokens_seen = step × it. A checkpoint that
    cannot be had stops this before any work."""
    by_label = labelled(hf_checkpoints([str(d) for d in model_dirs]), labels)
    for c in by_label.values():  # a checkpoint that cannot be had (e.g. not cached, offline) stops us now
        c.file("config.json")
    order = list(by_label)
    checkpoints = []
    for i, label in enumerate(order):
        step = step_of(i, label, labels is not None)
        checkpoints.append(Checkpoint(step, float(step * tokens_per_step) if tokens_per_step else float("nan"),
                                      label))
    return Source(checkpoints, lambda label, device: by_label[label].load(), order[-1]), by_label[order[0]]


def hf_replay(model_dirs: list[str | Path], labels: list[str] | None = None, analyses: str | list[str] = "all",
              source: ProbeSource | None = None, batch_size: int = 16, options: dict[str, dict] | None = None,
              shard: tuple[int, int] | None = None, tokens_per_step: int | None = None,
              done: frozenset[int] | set[int] = frozenset()) -> Replay:
    """The replay of Hugging Face checkpoints (`hf_source`) on the probe windows and token counts of `source`;
    with `shard` (index, count), of that shard's part only; less the steps `done`."""
    checkpoints, first = hf_source(model_dirs, labels, tokens_per_step)
    tokens, context = _probe_and_context(first, source or ProbeSource())
    return Replay(checkpoints, tokens, analyses, context, batch_size, options, shard, done)


