"""`sparsity`: MLP activation sparsity and neuron death per layer.

Wild & Anderson 2024, "Uncovering Layer-Dependent Activation Sparsity Patterns in ReLU
Transformers". A unit is *active* on a token when its pre-activation `blocks.{l}.mlp.hook_pre` is
> 0. For ReLU (and relu²) this is exactly a nonzero output, the paper's hard-zero criterion; for
GELU and other smooth activations (and the gate of SwiGLU) it is the pre-activation sign, which is
not comparable with the paper's numbers but keeps the analysis running.

Usage, on the probe set, per layer l:
- `sparsity/token_density_mean/L{l}` and `_p5`, `_p25`, `_p50`, `_p75`, `_p95`: fraction of units
  active per probe token.
- `sparsity/seq_usage_mean/L{l}`: fraction of units active at least once in a probe window.
- `sparsity/batch_usage/L{l}`: fraction of units active at least once in a fixed window of
  `batch_window_tokens` tokens (default 8192, the paper's Fig. 1; `sparsity/batch_window_tokens` says
  how many the probe set had): the first tokens of the probe set in order, whatever the context
  length or the sharding (an OR across ranks, never an average).
- `sparsity/always_on_frac/L{l}`: units active on ≥ 99% of probe tokens; `sparsity/freq_median/L{l}`.

Death is judged separately, over at least `dead_min_tokens` tokens (default 2^20 ≈ 1M): by default
the training batches (`dead_source: training`, online only; their forward passes are watched), or
the whole probe set (`dead_source: probe`, online and offline, judged only when the probe set has
that many tokens: a larger probe stream). Training tokens accumulate across checkpoints until there
are enough; a judgement then covers every training token since the previous judgement. Per layer,
at each judgement:
- `sparsity/dead_frac/L{l}`, `sparsity/dead_count/L{l}`: units active on none of the judged tokens;
  `sparsity/dead_window_tokens`: how many tokens were judged.
- `sparsity/never_fired/L{l}`: dead at every judgement so far. The judgements tile the training
  stream from step 0 (the first covers every training token before it), so these are the units that
  have fired on no training token since initialisation; with `dead_source: probe`, on the probe set at
  every judgement.
- `sparsity/turned_off/L{l}`, `sparsity/revived/L{l}`: alive at the previous judgement and dead now,
  and the reverse (counts).
- `sparsity/dead_fire_on_probe/L{l}` (training source): dead units that fire on at least one probe
  token with this checkpoint's weights: units the training stream missed by chance (rare firers), or
  that the weights at the checkpoint revived; dead for good when it reads 0. (An earlier chance null,
  Σ(1 − p_f)^N over the previously alive units, read ≤ 3e-58 at every judgement of the demo: a unit
  that fired at a rate above 1/N before cannot miss N tokens by chance, so it could not say anything.)
- `sparsity/sleeping_frac/L{l}`: dead units whose maximum pre-activation is within `sleep_margin`
  (default 0.1) of zero, told apart from units far below; `sparsity/dead_margin_median/L{l}`. Both are
  absent for a layer without dead units.
- Training source only, for the paper's check that death follows training dynamics rather than
  outlier updates: `sparsity/interval_grad_norm_max` (largest gradient norm before clipping) and
  `sparsity/interval_loss_jump_max` (largest one-step rise of the training loss) over the judged
  interval, to set against `turned_off` (the report draws them together).

Departures: the paper's exact percentiles and its test of "training-driven" death were not
retrievable; the percentiles, the probe check of dead units and the spike check are ours (spec §1.3). With the
tiny presets a run sees fewer than 2^20 training tokens, so they judge every 2^17 (stated in the
presets).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import Analysis, AnalysisContext, Measurement
from dynascope.analysis.figures import RunPlot, changes
from dynascope.analysis.onsets import Event
from dynascope.analysis.view import Cache, ModelShape
from dynascope.core.errors import DynascopeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PERCENTILES = (5, 25, 50, 75, 95)


class Sparsity(Analysis):
    name = "sparsity"
    headline = "sparsity/batch_usage/L0"  # the overview draws every layer of this metric
    carry = ("pending", "prev_alive", "never_fired")
    training_keys = tuple(f"sparsity/{k}" for k in (
        "dead_", "turned_off", "revived", "never_fired", "sleeping_frac", "interval_"))
    title = "ReLU sparsity and neuron death"
    paper = "Wild & Anderson 2024"
    paper_url = "https://arxiv.org/abs/2407.07848"
    signature = "a layer stops using many of its units (the first, in the paper): batch usage falls below its threshold"
    signature_event = "sparsity/usage_dip"
    expectation = ("Units active at least once in a fixed token window, per layer, and units that stop firing on the "
                   "training stream. Expect the first layer to collapse while the last stays used, and units to turn "
                   "off in bursts unrelated to gradient spikes if death follows training dynamics.")
    compare_keys = ("sparsity/batch_usage", "sparsity/dead_frac")

    def __init__(self, shape: ModelShape, context: AnalysisContext, batch_window_tokens: int = 8192,
                 dead_min_tokens: int = 2 ** 20, dead_source: str = "training", sleep_margin: float = 0.1,
                 usage_dip: float = 0.9):
        super().__init__(shape, context)
        if dead_source not in ("training", "probe"):
            raise DynascopeError(f"sparsity dead_source {dead_source!r}: choose training or probe")
        self.batch_window_tokens, self.dead_min_tokens, self.dead_source = (batch_window_tokens, dead_min_tokens,
                                                                             dead_source)
        self.sleep_margin, self.usage_dip = sleep_margin, usage_dip
        L, F = shape.n_layers, shape.d_mlp
        self.add_state("density", default=[], dist_reduce_fx="cat")  # [tokens, L]
        self.add_state("seq_usage", default=[], dist_reduce_fx="cat")  # [windows, L]
        self.add_state("window_fired", torch.zeros(L, F, dtype=torch.uint8), dist_reduce_fx="max")  # OR over ranks
        self.add_state("window_tokens", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(L, F, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("zmax", torch.full((L, F), float("-inf")), dist_reduce_fx="max")
        self.add_state("n_tokens", torch.tensor(0), dist_reduce_fx="sum")
        # the training stream between checkpoints
        self.add_state("train_fired", torch.zeros(L, F, dtype=torch.uint8), dist_reduce_fx="max")
        self.add_state("train_counts", torch.zeros(L, F, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("train_zmax", torch.full((L, F), float("-inf")), dist_reduce_fx="max")
        self.add_state("train_tokens", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("train_grad_norm_max", torch.tensor(float("-inf")), dist_reduce_fx="max")
        self.add_state("train_loss_jump_max", torch.tensor(float("-inf")), dist_reduce_fx="max")
        self._last_loss: float | None = None  # this rank's previous training loss
        self.pending: dict | None = None  # training stream not judged yet (too few tokens)
        self.prev_alive: torch.Tensor | None = None
        self.never_fired: torch.Tensor | None = None

    def hook_names(self) -> list[str]:
        return [f"blocks.{l}.mlp.hook_pre" for l in range(self.shape.n_layers)]

    def training_hook_names(self) -> list[str]:
        return self.hook_names() if self.dead_source == "training" else []

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        T = tokens.shape[1]
        in_window = windows[:, None] * T + torch.arange(T, device=tokens.device) < self.batch_window_tokens
        density, seq_usage = [], []
        for l, name in enumerate(self.hook_names()):  # layer by layer: stacking them costs more than the sums
            z = cache[name].float()  # [B, T, F]
            on = z > 0
            density.append(on.sum(-1).flatten() / on.shape[-1])
            seq_usage.append(on.any(dim=1).sum(-1) / on.shape[-1])
            self.window_fired[l] |= on[in_window].any(dim=0).to(torch.uint8)
            self.counts[l] += on.flatten(0, 1).sum(dim=0)
            self.zmax[l] = torch.maximum(self.zmax[l], z.flatten(0, 1).amax(dim=0))
        self.density.append(torch.stack(density, 1))  # [B·T, L]
        self.seq_usage.append(torch.stack(seq_usage, 1))  # [B, L]
        self.window_tokens += in_window.sum()
        self.n_tokens += tokens.numel()

    def observe_training(self, name: str, activation: torch.Tensor) -> None:
        """Streaming OR, counts and maxima of the units on training tokens (the training forward pass)."""
        layer = int(name.split(".")[1])
        z = activation.detach().flatten(0, -2)
        on = z > 0
        self.train_fired[layer] |= on.any(dim=0).to(torch.uint8)
        self.train_counts[layer] += on.sum(dim=0)
        self.train_zmax[layer] = torch.maximum(self.train_zmax[layer], z.float().amax(dim=0))
        if layer == 0:
            self.train_tokens += on.shape[0]

    def observe_step(self, loss: float, grad_norm: float) -> None:
        self.train_grad_norm_max.fill_(max(self.train_grad_norm_max.item(), grad_norm))
        if self._last_loss is not None:
            self.train_loss_jump_max.fill_(max(self.train_loss_jump_max.item(), loss - self._last_loss))
        self._last_loss = loss

    def compute(self) -> Measurement:
        density, seq = dim_zero_cat(self.density), dim_zero_cat(self.seq_usage)
        q = torch.tensor([p / 100 for p in PERCENTILES], device=density.device)
        dq = density.quantile(q, dim=0)  # [P, L]
        freq = self.counts.double() / self.n_tokens
        usage = self.window_fired.bool().float().mean(-1)
        out: dict[str, float] = {"sparsity/batch_window_tokens": float(self.window_tokens)}
        for l in range(self.shape.n_layers):
            per = {"token_density_mean": density[:, l].mean().item(), "seq_usage_mean": seq[:, l].mean().item(),
                   "batch_usage": usage[l].item(), "always_on_frac": (freq[l] >= 0.99).float().mean().item(),
                   "freq_median": freq[l].median().item()}
            per |= {f"token_density_p{p}": dq[i, l].item() for i, p in enumerate(PERCENTILES)}
            out |= {f"sparsity/{k}/L{l}": v for k, v in per.items()}
        stream = self._stream()
        if stream is None or stream["tokens"] < self.dead_min_tokens:
            return Measurement(out, carry={"pending": stream})
        values, carry = self._judge(stream)
        return Measurement(out | values, carry=carry | {"pending": None})

    def events(self) -> list[Event]:
        """First death: from then on, some layer has a dead unit at every judgement (judgements only). Usage dip:
        the first checkpoint at which some layer's batch usage falls below `usage_dip` (0.9). Neither is
        resampled: death is judged on the training stream, not the probe set, and batch usage is a union over
        one fixed window of probe tokens, which a bootstrap of windows would bias downwards."""
        L = self.shape.n_layers
        return [Event("sparsity/first_death",
                      lambda values, previous: sum(values[f"sparsity/dead_count/L{l}"] for l in range(L)) >= 1,
                      shown="sparsity/dead_frac"),
                Event("sparsity/usage_dip", lambda values, previous: min(
                    values[f"sparsity/batch_usage/L{l}"] for l in range(L)) < self.usage_dip, sustained=False,
                    shown="sparsity/batch_usage", threshold=self.usage_dip)]

    def _stream(self) -> dict | None:
        """The tokens death is judged on: the probe set, or the training stream since the last judgement."""
        if self.dead_source == "probe":
            return {"fired": self.counts > 0, "counts": self.counts, "zmax": self.zmax, "tokens": int(self.n_tokens)}
        if self.train_tokens == 0 and self.pending is None:
            return None
        new = {"fired": self.train_fired.bool(), "counts": self.train_counts, "zmax": self.train_zmax,
               "tokens": int(self.train_tokens), "grad_norm_max": self.train_grad_norm_max.item(),
               "loss_jump_max": self.train_loss_jump_max.item()}
        old = self.pending
        if old is None:
            return new
        old = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in old.items()}
        return {"fired": old["fired"] | new["fired"], "counts": old["counts"] + new["counts"],
                "zmax": torch.maximum(old["zmax"], new["zmax"]), "tokens": old["tokens"] + new["tokens"],
                "grad_norm_max": max(old["grad_norm_max"], new["grad_norm_max"]),
                "loss_jump_max": max(old["loss_jump_max"], new["loss_jump_max"])}

    def _judge(self, stream: dict) -> tuple[dict[str, float], dict]:
        alive, n = stream["fired"], stream["tokens"]
        dead = ~alive
        prev_alive = None if self.prev_alive is None else self.prev_alive.to(alive.device)
        never = dead.clone() if self.never_fired is None else self.never_fired.to(dead.device) & dead
        on_probe = dead & (self.counts > 0) if self.dead_source == "training" else None
        out: dict[str, float] = {"sparsity/dead_window_tokens": float(n)}
        for l in range(self.shape.n_layers):
            per = {"dead_frac": dead[l].float().mean().item(), "dead_count": float(dead[l].sum()),
                   "never_fired": float(never[l].sum())}
            margins = stream["zmax"][l][dead[l]]
            if len(margins):
                per |= {"sleeping_frac": (margins > -self.sleep_margin).float().mean().item(),
                        "dead_margin_median": margins.median().item()}
            if on_probe is not None:
                per["dead_fire_on_probe"] = float(on_probe[l].sum())
            if prev_alive is not None:
                per |= {"turned_off": float((prev_alive[l] & dead[l]).sum()),
                        "revived": float((~prev_alive[l] & alive[l]).sum())}
            out |= {f"sparsity/{k}/L{l}": v for k, v in per.items()}
        if "grad_norm_max" in stream:  # -inf: no step (or no second step) in the interval
            out |= {f"sparsity/interval_{k}": stream[k] if math.isfinite(stream[k]) else math.nan
                    for k in ("grad_norm_max", "loss_jump_max")}
        return out, {"prev_alive": alive.clone(), "never_fired": never}

    @classmethod
    def figures(cls, plot: RunPlot) -> list[Figure]:
        def usage(ax) -> bool:
            tokens = plot.history.last("sparsity/batch_window_tokens")
            return plot.layers(ax, "sparsity/batch_usage", f"batch usage ({tokens:,.0f}-token window)",
                               "units active at least once", emphasise_ends=True)

        def dead(ax) -> bool:
            return plot.layers(ax, "sparsity/dead_frac", "dead units (judged on the training stream)",
                               "fraction of units")

        def turning(ax) -> bool:
            totals = {}
            for kind, label in (("turned_off", "turned off"), ("revived", "revived"),
                                ("dead_fire_on_probe", "dead, firing on the probe")):
                layers = plot.layered(f"sparsity/{kind}")
                if layers:
                    xs = next(iter(layers.values()))[0]
                    totals[label] = (xs, [sum(layers[l][1][i] for l in layers) for i in range(len(xs))])
            if not any(changes(ys) for _, ys in totals.values()):  # the grad-norm spikes alone say nothing
                return plot.leave_out("“units turned off and revived”: none turned off or revived")
            return plot.two_scales(ax, totals, ("max grad norm in the interval",
                                                plot.series("sparsity/interval_grad_norm_max")),
                                   "units turned off and revived (all layers) against gradient spikes", "units")

        return [fig for fig in [plot.row([usage, dead, turning])] if fig is not None]
