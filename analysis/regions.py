"""`regions`: sharpness of stable-region boundaries in the residual stream.

Janiak et al. 2024, "Characterizing stable regions in the residual stream of LLMs" (procedure of
the authors' code, `jettjaniak/reometry`). For a prompt pair (A, B), take the residual stream after
block `w` (`blocks.{w}.hook_resid_post`) at the last position for A and for B; for α on a fixed grid
of N points patch x(α) = (1 − α)·A + α·B into A's forward pass at that layer and position, and read
the final-norm output at the last position (`ln_final.hook_normalized`, the vector fed to the
unembedding). d(α) = ‖out(α) − out(0)‖₂; pairs with d(1) ≤ 0.01 are dropped (counted);
d̃ = d / d(1); sharpness S = max_k (d̃_{k+1} − d̃_k)·(N − 1): 1 for a straight line, N − 1 for a step.

Keys, per write layer w (`/L{w}`) and, without the suffix, for the first write layer:
`regions/sharpness_median`, `regions/sharpness_p25`, `regions/sharpness_p75` (over kept pairs),
`regions/kl_mid` (mean KL(p(α=0) ‖ p(α=½)) of the output distributions), `regions/dropped_pairs`,
and for ReLU models `regions/relu_flips_mean` (units of the last MLP whose on/off state at the last
position differs between the two ends of the path, α = 0 and α = 1: the authors' `mlp_a_on !=
mlp_b_on`) and `regions/relu_flips_path_mean` (units whose state differs from α = 0 anywhere along
the path: also those that turn off and on again on the way). A count of the α steps where d̃ rises by
more than 0.2 (regions crossed) is not logged: it read ≈ 0 at init and after training on the demo. The table
`regions/median_curve` holds, per write layer, the median curve d̃(α) and its interquartile band.

Prompts are 10-token chunks of the probe windows, which sit at independent random offsets of the
validation split, as the paper's are random chunks of a corpus. Probe windows are paired: window 2i
with window 2i + 1 (probe batches and shards hold whole pairs when the batch size is even). A pair of
prompts is the k-th chunk of one window's first half (A) and the k-th chunk of its partner's second
half (B), `pairs_per_window` per window (default 2, so 128 pairs for the default 64 probe windows):
the two prompts come from different windows, so from different documents unless the two windows
overlap one. A window without a partner in its batch pairs with itself.

Cost: the patch is at the last position, so every earlier position is the clean pass's. On dynascope's
own model the view recomputes only the last position from block w + 1 to the final norm, over the clean
prefix's keys and values (`TransformerView.patch_last_position`); Hugging Face models take one full
patched pass per α. The two agree to float32 rounding (≤ 4e-5 on sharpness, measured on the demo's
snapshots). Only the two points `kl_mid` compares are unembedded.

Departures from the paper: the default grid has N = 21 points (the paper's figures use 50, its
scripts 11 or 30); S depends on N, so keep it fixed across runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import Analysis, AnalysisContext, Measurement, Table
from dynascope.analysis.figures import RunPlot, layer_color, time_colors
from dynascope.analysis.onsets import Event, resample_counts, weighted_quantile
from dynascope.analysis.view import Cache, ModelShape
from dynascope.core.errors import DynascopeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MIN_D1 = 0.01


class Regions(Analysis):
    name = "regions"
    headline = "regions/sharpness_median"
    curve_tables = ("regions/median_curve",)
    title = "Stable regions in the residual stream"
    paper = "Janiak et al. 2024"
    paper_url = "https://arxiv.org/abs/2409.17113"
    signature = "the boundaries between the residual stream's stable regions sharpen (median sharpness S rises)"
    signature_event = "regions/sharpening"
    expectation = ("Output distance along the straight path between two prompts' residuals. A straight line (S ≈ 1) "
                   "at initialisation; a sigmoid-like step, and S rising with training, once stable regions form.")
    reference_lines = {"regions/sharpness_median": 1.0}  # 1: no region boundary

    def __init__(self, shape: ModelShape, context: AnalysisContext, write_layers: list[int] | None = None,
                 n_alpha: int = 21, prompt_length: int = 10, pairs_per_window: int = 2, chunk: int = 512,
                 sharp: float = 1.25):
        super().__init__(shape, context)
        self.sharp = sharp
        self.write_layers = write_layers if write_layers is not None else sorted({0, shape.n_layers // 2})
        if any(not 0 <= w < shape.n_layers for w in self.write_layers):
            raise DynascopeError(f"regions write_layers {self.write_layers} outside 0..{shape.n_layers - 1}")
        self.n_alpha, self.prompt_length, self.pairs_per_window, self.chunk = (n_alpha, prompt_length,
                                                                                pairs_per_window, chunk)
        for w in self.write_layers:
            for state in ("sharpness", "kl_mid", "flips", "path_flips", "curves", "windows"):
                self.add_state(f"{state}_L{w}", default=[], dist_reduce_fx="cat")
            self.add_state(f"dropped_L{w}", torch.tensor(0), dist_reduce_fx="sum")

    def prompt_pairs(self, tokens: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A from the first half of each window, B from the second half of its partner window (2i ↔ 2i + 1):
        [n_windows·pairs_per_window, L] each."""
        L, half = self.prompt_length, tokens.shape[1] // 2
        if self.pairs_per_window * L > half:
            raise DynascopeError(f"regions needs windows of at least {2 * self.pairs_per_window * L} tokens, "
                                 f"got {tokens.shape[1]}")
        row = {w: i for i, w in enumerate(windows.tolist())}
        partner = torch.tensor([row.get(w ^ 1, i) for i, w in enumerate(windows.tolist())], device=tokens.device)
        a = [tokens[:, k * L:(k + 1) * L] for k in range(self.pairs_per_window)]
        b = [tokens[partner, half + k * L:half + (k + 1) * L] for k in range(self.pairs_per_window)]
        return torch.cat(a), torch.cat(b)

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        view = self.view
        A, B = self.prompt_pairs(tokens, windows)
        last_mlp = f"blocks.{self.shape.n_layers - 1}.mlp.hook_pre"
        extra = [last_mlp] if self.shape.is_relu else []
        sites = [f"blocks.{w}.hook_resid_post" for w in self.write_layers]
        reused = view.patch_hooks(min(self.write_layers))  # the clean pass the patched passes attend to
        _, clean = view.run_with_cache(A, [*sites, "ln_final.hook_normalized", *extra, *reused])
        _, clean_b = view.run_with_cache(B, sites)
        alpha = torch.linspace(0, 1, self.n_alpha, device=A.device)
        per_chunk = max(1, self.chunk // self.n_alpha)  # prompts whose patched paths are computed together
        for w, site in zip(self.write_layers, sites, strict=True):
            a, b = clean[site][:, -1].float(), clean_b[site][:, -1].float()
            x = a[:, None] + alpha[None, :, None] * (b - a)[:, None]  # [P, N, d]
            outs, pres = [], []
            for i in range(0, len(A), per_chunk):
                c = view.patch_last_position(A[i:i + per_chunk], w, x[i:i + per_chunk],
                                             ["ln_final.hook_normalized", *extra],
                                             {n: t[i:i + per_chunk] for n, t in clean.items()})
                outs.append(c["ln_final.hook_normalized"].float())
                if extra:
                    pres.append(c[last_mlp] > 0)
            out = torch.cat(outs)  # [P, N, d]
            d = (out - clean["ln_final.hook_normalized"][:, -1, None].float()).norm(dim=-1)  # [P, N]
            keep = d[:, -1] > MIN_D1
            getattr(self, f"dropped_L{w}").add_((~keep).sum())
            dn = d[keep] / d[keep, -1:]
            steps = dn.diff(dim=1)
            getattr(self, f"sharpness_L{w}").append(steps.amax(dim=1) * (self.n_alpha - 1))
            getattr(self, f"windows_L{w}").append(windows.repeat(self.pairs_per_window)[keep])  # each pair's A
            getattr(self, f"curves_L{w}").append(dn)
            mid = (self.n_alpha - 1) // 2
            lp = view.unembed(out[keep][:, [0, mid]]).log_softmax(-1)  # only the two points kl_mid compares
            getattr(self, f"kl_mid_L{w}").append((lp[:, 0].exp() * (lp[:, 0] - lp[:, 1])).sum(-1))
            if extra:
                on = torch.cat(pres)[keep]  # [P, N, units]
                getattr(self, f"flips_L{w}").append((on[:, -1] != on[:, 0]).sum(-1).float())
                getattr(self, f"path_flips_L{w}").append((on != on[:, :1]).any(dim=1).sum(-1).float())

    def _cat(self, state: str, w: int) -> torch.Tensor:
        values = getattr(self, f"{state}_L{w}")
        return dim_zero_cat(values) if len(values) else torch.empty(0)

    def compute(self) -> Measurement:
        out: dict[str, float] = {}
        for i, w in enumerate(self.write_layers):
            s = self._cat("sharpness", w)
            q = s.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=s.dtype)).tolist() if len(s) else [float("nan")] * 3
            layer = {"sharpness_p25": q[0], "sharpness_median": q[1], "sharpness_p75": q[2],
                     "kl_mid": self._cat("kl_mid", w).mean().item(),
                     "dropped_pairs": float(getattr(self, f"dropped_L{w}"))}
            if self.shape.is_relu:
                layer["relu_flips_mean"] = self._cat("flips", w).mean().item()
                layer["relu_flips_path_mean"] = self._cat("path_flips", w).mean().item()
            out |= {f"regions/{k}/L{w}": v for k, v in layer.items()}
            if i == 0:
                out |= {f"regions/{k}": v for k, v in layer.items()}
        columns, series = ["alpha"], []
        for w in self.write_layers:
            c = self._cat("curves", w)
            if len(c):
                band = c.quantile(torch.tensor([0.25, 0.75], dtype=c.dtype, device=c.device), dim=0)
                series += [c.median(dim=0).values, band[0], band[1]]
            else:
                series += [torch.full((self.n_alpha,), float("nan"))] * 3
            columns += [f"L{w}", f"L{w} p25", f"L{w} p75"]
        alpha = torch.linspace(0, 1, self.n_alpha)
        rows = torch.stack([alpha, *(s.cpu() for s in series)], dim=1).tolist()
        first = self.write_layers[0]
        sharpness, windows = self._cat("sharpness", first), self._cat("windows", first)
        replicates = {}
        if len(sharpness):
            ids, pair_window = torch.unique(windows, return_inverse=True)
            weights = resample_counts(len(ids)).to(sharpness.device)[:, pair_window]
            replicates["regions/sharpness_median"] = weighted_quantile(sharpness.double(), weights, 0.5).tolist()
        return Measurement(out, tables={"regions/median_curve": Table(columns, rows)}, replicates=replicates)

    def events(self) -> list[Event]:
        """Sharpening: from then on, the median sharpness at the first write layer is at least `sharp` (1.25;
        ≈ 1.1 at initialisation). Resampled: the probe windows the prompt pairs come from (each replicate's
        median is the lower weighted median of its pairs)."""
        return [Event("regions/sharpening",
                      lambda values, previous: values["regions/sharpness_median"] >= self.sharp,
                      resampled="the probe windows of the prompt pairs", shown="regions/sharpness_median",
                      threshold=self.sharp)]

    @classmethod
    def figures(cls, plot: RunPlot) -> list[Figure]:
        def curves(ax) -> bool:
            entries = plot.history.table("regions/median_curve")
            if not entries:
                return False
            columns = entries[0]["columns"]
            first = columns[1]
            j, lo, hi = columns.index(first), columns.index(f"{first} p25"), columns.index(f"{first} p75")
            picks = entries if len(entries) <= 5 else [entries[round(i * (len(entries) - 1) / 4)] for i in range(5)]
            for color, entry in zip(time_colors(len(picks)), picks, strict=True):
                rows = entry["rows"]
                alpha = [r[0] for r in rows]
                ax.plot(alpha, [r[j] for r in rows], color=color, label=f"step {entry['step']}")
                ax.fill_between(alpha, [r[lo] for r in rows], [r[hi] for r in rows], color=color, alpha=0.12)
            ax.plot([0, 1], [0, 1], color="gray", linewidth=0.5, linestyle=":")
            ax.set(xlabel="α (A → B)", ylabel="d̃(α) = d(α)/d(1)")
            ax.set_title(f"median output distance along the path, write layer {first[1:]} (IQR band)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            return True

        def sharpness(ax) -> bool:
            layers = plot.layered("regions/sharpness_median")  # per write layer
            reason = plot.empty("boundary sharpness S", list(layers.values()))
            if reason:
                return plot.leave_out(reason)
            for l, (xs, ys) in layers.items():
                color = layer_color(l, plot.n_layers)
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=f"write layer {l}")
                ax.fill_between(xs, plot.series(f"regions/sharpness_p25/L{l}")[1],
                                plot.series(f"regions/sharpness_p75/L{l}")[1], color=color, alpha=0.15)
            ax.axhline(1.0, color="gray", linewidth=0.5)
            plot.finish(ax, "boundary sharpness S (median, IQR): 1 = no boundary", "S", legend=True)
            return True

        return [fig for fig in [plot.row([curves, sharpness])] if fig is not None]
