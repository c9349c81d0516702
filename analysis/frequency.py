"""`frequency`: how linearly the unembedding encodes token frequency, and when that encoding settles.

Cho et al. 2025, "Understanding Token Probability Encoding in Output Embeddings": −log of a token's
probability is close to a shared linear function of its output embedding, −log p_w ≈ A·E[w] + B
(E the unembedding [V, d], row w the output embedding of token w). The tokens used are those of the
tokenizer's vocabulary seen at least `min_count` (default 10) times in the run's training split
(`counts.npy`): padded rows and rare tokens are left out. Fits are ridge-stabilised least squares in
float64 (λ = 1e-3, centred) on 80% of these tokens (seeded split), scored on the held-out 20%.

- `frequency/r2_corpus`, `frequency/spearman_corpus`: the held-out fit of −log(corpus frequency)
  from E[w]. With an LM-head bias b the target becomes y + b (the bias carries frequency itself;
  spec pitfall 3). Near 0 at random init; high once the encoding is learned.
- `frequency/r2_output`: the held-out R² of −log α_w (α the model's mean output probability over the
  probe positions) fitted linearly on −log(corpus frequency): how closely the model's average
  prediction follows corpus frequency. Near 0 at random init (α is almost uniform), near 1 once the
  model has learned the unigram distribution. Departure: paper B's own fit of −log α from E[w] orders
  the deletion but its R² is not logged. It is close to exact whenever the final hidden states h are
  concentrated, whatever the weights learned (α_w ≈ exp(E[w]·h̄)/Z): it reads 0.999 at random init, so
  it cannot show learning.
- The deletion curve (paper B): zero-ablating the fraction ρ of dimensions of the final-norm output with
  the smallest |A_α,d|, A_α the fit of −log α from E[w] over every row of E (the paper's order: the
  direction the model's own predictions use; no corpus counts needed), gives a mean KL(full ‖ deleted)
  on the probe positions. The same in the order of the corpus fit's |A| (ours, a second curve: how
  much of what the predictions use is the frequency code) and in `N_PERMUTATIONS` (5) seeded random
  orders (control), each on its own fifth of the positions, so that the control is the mean over positions,
  each deleted in one of the 5 orders. It was every order at every position: its expectation is the same,
  for a fifth of the cost, and its sampling error that of one order per position; on the demo's snapshots
  (512 positions) the control at ρ = 0.3 moved by at most 2.2%, on probes of tens of positions by up to 9%
  (with fewer than 5 positions, fewer orders are drawn). Table
  `frequency/deletion_curve` (ρ = 0.1 … 0.9), keys
  `frequency/deletion_kl_0.3`, `frequency/deletion_kl_corpus_0.3` and `frequency/deletion_kl_random_0.3`,
  and `frequency/deletable_frac_0.01` / `_0.1`: the largest ρ (steps of 1/20) in the paper's order whose
  KL stays below 0.01 / 0.1 nats. Each deletion extends the previous one, so the logits are updated by
  the newly deleted dimensions only (`deletion_kls`; equal to ablating from scratch to ~3e-7 nats on
  the demo's snapshots), on a seeded subsample of at most `deletion_positions` (512) of the positions:
  on the demo's step-300 snapshot (1,700 positions) this moved the KL at ρ = 0.3 by 2.4%.
- Link to outlier dimensions: `frequency/cos_A_mean_h` = cos(A, −mean h) (theory: A ≈ −h̄), and
  `frequency/od_overlap`: the fraction of the top-|A| dimensions (as many as there are ODs) that are
  outlier dimensions, taken from the outliers analysis of the same checkpoint (absent without ODs, or
  when that analysis is not measured). h is the final-norm output at every `position_stride`-th deep
  position (the outliers analysis's positions: more than `skip_positions` tokens of their own document).
- Convergence, per step so that checkpoints 1 and 1,000 steps apart compare:
  `frequency/direction_turn_per_step` (the angle between A and the previous checkpoint's A, in
  degrees, over the steps between them) and `frequency/wu_change_per_step` (‖E_t − E_prev‖ / ‖E_t‖
  over the steps between them). Both still follow the learning rate: weights move as fast as it lets
  them. The onset `frequency/converged`: r2_corpus ≥ `min_r2` (0.5) and a turn of at most
  `max_turn_per_step` (0.2°) per step, at every checkpoint from then on. Offline, with the final
  checkpoint known: `frequency/dist_to_final` = ‖E_t − E_final‖ / ‖E_final‖, the paper's view ("the
  encoding settles before the weights do") beside r2_corpus; the report draws that panel offline only.
- Tables for the report: `frequency/pca` (the first two principal components of up to 500 of the
  fitted tokens' output embeddings, with each token's corpus-frequency rank as a fraction, 0 the most
  frequent) and `frequency/fit` (up to 500 held-out tokens: actual and predicted −log frequency).

Tied embeddings: E is then also the input embedding, so the frequency code is pushed from both
ends and lives in the inputs too; the fit is the same, on the shared matrix. Which inputs paper B
averaged α over was not retrievable (spec §7); its KL threshold for "deletable" was not either. The
sparsity of A as (Σ|A|)²/ΣA² is not logged: it depends on the basis (a perfect one-direction code reads
1 along an axis and ~d/1.6 along a random direction) and read ~85 of 128 at init and after training.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import PROBS, Analysis, AnalysisContext, Measurement, Table
from dynascope.analysis.figures import RunPlot
from dynascope.analysis.onsets import Event, resample_counts
from dynascope.analysis.outliers import deep_positions, spearman
from dynascope.analysis.view import Cache, ModelShape, ModelView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FRACTIONS = [i / 20 for i in range(1, 20)]  # deletion fractions in |A| order
CURVE = [i / 10 for i in range(1, 10)]  # the logged deletion curve (and its random-order control)
N_PERMUTATIONS = 5  # random deletion orders, each on its own share of the positions
TABLE_TOKENS = 500


def ridge_fit(X: torch.Tensor, y: torch.Tensor, lam: float = 1e-3, holdout: float = 0.2,
              seed: int = 0) -> tuple[torch.Tensor, float, float, float, torch.Tensor, torch.Tensor]:
    """(A, B, held-out R², held-out Spearman, held-out indices, their predictions) of y ≈ X·A + B, in float64."""
    X, y = X.double(), y.double()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(X.device)
    n_test = max(1, int(holdout * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    mx, my = X[train].mean(0), y[train].mean()
    Xc = X[train] - mx
    A = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype, device=X.device),
                           Xc.T @ (y[train] - my))
    B = (my - mx @ A).item()
    pred = X[test] @ A + B
    r2 = 1 - ((y[test] - pred) ** 2).sum() / ((y[test] - y[test].mean()) ** 2).sum()
    return A, B, r2.item(), spearman(pred, y[test]), test, pred


def resampled_r2(actual: torch.Tensor, predicted: torch.Tensor) -> list[float]:
    """The held-out R² on each bootstrap replicate of the held-out tokens."""
    w = resample_counts(len(actual)).to(actual.device)
    mean = (w @ actual / w.sum(1))[:, None]
    return (1 - (w * (actual - predicted).square()).sum(1) / (w * (actual - mean).square()).sum(1)).tolist()


def deletion_kls(view: ModelView, h: torch.Tensor, orders: list[tuple[torch.Tensor, list[float]]],
                 chunk: int = 1024) -> list[list[float]]:
    """Mean KL(full ‖ deleted) over final-norm outputs h [n, d] when the first ⌊ρ·d⌋ dimensions of an order
    are zero-ablated, for each (order, increasing fractions ρ) in `orders`. Each deletion extends the
    previous one, so the logits z′ are updated by the newly deleted dimensions only, and
    KL = Σ p·log p − p·z′ + logsumexp(z′), with p·z′ updated through p·E (one [n, d] product)."""
    W = view.output_embeddings.float()
    rows = W.T.contiguous()  # [d, V]: a deletion order's rows are then one gather
    sums = [[0.0] * len(fractions) for _, fractions in orders]
    for i in range(0, len(h), chunk):
        hc = h[i:i + chunk].float()
        z = view.unembed(hc)
        lp = z.log_softmax(-1)
        p = lp.exp()
        pW = p @ W  # [n, d]: p·z′ = p·z − Σ over deleted dims j of h_j (p·E)_j
        entropy_term = (p * lp).sum(-1) - (p * z).sum(-1)
        for (order, fractions), acc in zip(orders, sums, strict=True):
            h_o, pW_o, W_o = hc[:, order], pW[:, order], rows[order]  # in deletion order
            zd, kl_linear, done = z.clone(), entropy_term.clone(), 0
            for k, cut in enumerate(int(f * len(order)) for f in fractions):
                zd.addmm_(h_o[:, done:cut], W_o[done:cut], alpha=-1)
                kl_linear += (h_o[:, done:cut] * pW_o[:, done:cut]).sum(-1)
                acc[k] += (kl_linear + zd.logsumexp(-1)).sum().item()
                done = cut
    return [[s / len(h) for s in acc] for acc in sums]


class Frequency(Analysis):
    name = "frequency"
    headline = "frequency/r2_corpus"
    carry = ("prev_A", "prev_W", "prev_step")
    reads = ("outliers",)
    final_keys = ("frequency/dist_to_final",)
    title = "Frequency in the unembedding"
    paper = "Cho et al. 2025"
    paper_url = "https://arxiv.org/abs/2406.01468"
    signature = "the unembedding comes to encode log token frequency linearly (R² of the fit above its threshold)"
    signature_event = "frequency/encoded"
    expectation = ("How linearly −log corpus frequency can be read from each token's output embedding (held-out fit). "
                   "Expect the first PC to order tokens by frequency, R² to rise early and settle while the weights "
                   "are still far from their final values, and deletion in |A| order to cost less than a random "
                   "order.")
    compare_keys = ("frequency/r2_corpus", "frequency/direction_turn_per_step")

    def __init__(self, shape: ModelShape, context: AnalysisContext, min_count: int = 10, position_stride: int = 4,
                 skip_positions: int = 16, min_r2: float = 0.5, max_turn_per_step: float = 0.2,
                 deletion_positions: int = 512, seed: int = 0):
        super().__init__(shape, context)
        self.min_count, self.position_stride, self.skip_positions, self.seed = (min_count, position_stride,
                                                                                 skip_positions, seed)
        self.min_r2, self.max_turn_per_step = min_r2, max_turn_per_step
        self.deletion_positions = deletion_positions
        self.add_state("prob_sum", torch.zeros(shape.vocab_size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_positions", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("h", default=[], dist_reduce_fx="cat")
        self.prev_A: torch.Tensor | None = None
        self.prev_W: torch.Tensor | None = None
        self.prev_step: int | None = None

    def hook_names(self) -> list[str]:
        return ["ln_final.hook_normalized", PROBS]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        self.prob_sum += cache[PROBS].flatten(0, 1).sum(0).double()
        self.n_positions += tokens.numel()
        keep = deep_positions(tokens, self.skip_positions, self.context.eos_id, need_next=False,
                              stride=self.position_stride)  # the outliers analysis's positions, thinned
        self.h.append(cache["ln_final.hook_normalized"][keep].float())

    def compute(self) -> Measurement:
        W = self.view.output_embeddings.detach().double()
        out: dict[str, float] = {}
        tables: dict[str, Table] = {}
        carry: dict = {"prev_W": W.float().detach().clone(), "prev_step": self.step}
        interval = None if self.prev_step is None else self.step - self.prev_step
        if interval:
            out["frequency/wu_change_per_step"] = ((W.float() - self.prev_W.to(W.device)).norm() / W.float().norm()
                                                   ).item() / interval
        final = self.context.final_output_embeddings
        if final is not None:
            final = final.to(W.device, torch.float64)
            out["frequency/dist_to_final"] = ((W - final).norm() / final.norm()).item()
        # paper B's deletion order: the fit of −log α (the model's mean output probability) over every row
        alpha = (self.prob_sum / self.n_positions).clamp_min(1e-30)[:len(W)]
        A_alpha = ridge_fit(W, -alpha.log(), seed=self.seed)[0].float()
        orders = {"alpha": A_alpha}
        counts = self.context.counts
        replicates = {}
        if counts is not None:
            counts = counts.to(device=W.device, dtype=torch.float64)[:len(W)]
            tokens = torch.nonzero(counts >= self.min_count).flatten()  # padded rows lie beyond the counts
            y = -(counts[tokens] / counts.sum()).log()
            bias = self.view.output_bias
            target = y if bias is None else y + bias.detach().double()[tokens]
            A, _, r2, rho, test, pred = ridge_fit(W[tokens], target, seed=self.seed)
            A32 = orders["corpus"] = A.float()
            _, _, out["frequency/r2_output"], _, _, _ = ridge_fit(y[:, None], -alpha[tokens].log(), seed=self.seed)
            out |= {"frequency/r2_corpus": r2, "frequency/spearman_corpus": rho} | self._direction(A32, interval)
            tables |= self._figures(W[tokens], y, test, pred, target[test])
            carry["prev_A"] = A32.detach().clone()
            replicates["frequency/r2_corpus"] = resampled_r2(target[test], pred)
        tables["frequency/deletion_curve"], deletion = self._deletion(orders)
        return Measurement(out | deletion, tables, carry=carry, replicates=replicates)

    def events(self) -> list[Event]:
        """Encoded: R² of the corpus fit at least `min_r2` from then on. Converged: also the fitted direction A
        turning by at most `max_turn_per_step` degrees per step. Without corpus counts neither is judged."""
        def converged(values: dict, previous: dict | None) -> bool:
            turn = values.get("frequency/direction_turn_per_step")
            return turn is not None and values["frequency/r2_corpus"] >= self.min_r2 and turn <= self.max_turn_per_step

        tokens = "the held-out tokens of the corpus fit (R²); the fitted direction is the weights' and is not"
        return [Event("frequency/encoded", lambda values, previous: values["frequency/r2_corpus"] >= self.min_r2,
                      resampled=tokens, shown="frequency/r2_corpus", threshold=self.min_r2),
                Event("frequency/converged", converged, resampled=tokens, shown="frequency/r2_corpus",
                      threshold=self.min_r2)]

    def _direction(self, A: torch.Tensor, interval: int | None) -> dict[str, float]:
        h = dim_zero_cat(self.h)
        out = {"frequency/cos_A_mean_h": torch.cosine_similarity(A, -h.mean(0), dim=0).item()}
        if "outliers" in self.peers:
            ods = {dim for _, dim in self.peers["outliers"].tables["outliers/dims"].rows}
            if ods:
                top = set(A.abs().topk(len(ods)).indices.tolist())
                out["frequency/od_overlap"] = len(top & ods) / len(ods)
        if interval and self.prev_A is not None:
            cos = torch.cosine_similarity(A, self.prev_A.to(A.device), dim=0).clamp(-1, 1).item()
            out["frequency/direction_turn_per_step"] = math.degrees(math.acos(cos)) / interval
        return out

    def _deletion(self, orders: dict[str, torch.Tensor]) -> tuple[Table, dict[str, float]]:
        """KL after deleting the dimensions of smallest |A| first, for the α fit's A (paper B's order) and the
        corpus fit's, and in `N_PERMUTATIONS` seeded random orders, each on its own share of the positions (the
        mean over positions)."""
        h = dim_zero_cat(self.h)
        g = torch.Generator().manual_seed(self.seed)  # a seeded subsample, shuffled: the curve is a mean over positions
        h = h[torch.randperm(len(h), generator=g)[:self.deletion_positions].to(h.device)]
        d = len(orders["alpha"])
        fractions = {"alpha": FRACTIONS, "corpus": CURVE}  # the α order's finer steps give the deletable fractions
        kls = deletion_kls(self.view, h, [(A.abs().argsort(), fractions[name]) for name, A in orders.items()])
        by = {name: dict(zip(fractions[name], kl, strict=True)) for name, kl in zip(orders, kls, strict=True)}
        random = dict.fromkeys(CURVE, 0.0)
        parts = [part for part in h.tensor_split(N_PERMUTATIONS) if len(part)]  # shuffled above: random parts
        for i, part in enumerate(parts):
            order = torch.randperm(d, generator=torch.Generator().manual_seed(self.seed + i)).to(h.device)
            for f, kl in zip(CURVE, deletion_kls(self.view, part, [(order, CURVE)])[0], strict=True):
                random[f] += kl * len(part) / len(h)
        out = {f"frequency/deletable_frac_{tau}": max([f for f, kl in by["alpha"].items() if kl < tau], default=0.0)
               for tau in (0.01, 0.1)}
        out |= {"frequency/deletion_kl_0.3": by["alpha"][0.3], "frequency/deletion_kl_random_0.3": random[0.3]}
        columns = ["rho", "KL, smallest |A| of −log α first"]
        if "corpus" in by:
            out["frequency/deletion_kl_corpus_0.3"] = by["corpus"][0.3]
            columns.append("KL, smallest |A| of −log f first")
        curve = Table([*columns, f"KL, {N_PERMUTATIONS} random orders"],
                      [[f, *(by[name][f] for name in by), random[f]] for f in CURVE])
        return curve, out

    def _figures(self, X: torch.Tensor, y: torch.Tensor, test: torch.Tensor, pred: torch.Tensor,
                 actual: torch.Tensor) -> dict[str, Table]:
        """The unembedding's first two principal components coloured by frequency rank, and predicted vs
        actual −log frequency, on fixed subsamples of the tokens."""
        g = torch.Generator().manual_seed(self.seed)
        Xc = X - X.mean(0)
        _, vectors = torch.linalg.eigh(Xc.T @ Xc)
        pcs = Xc @ vectors[:, -2:].flip(1)  # [n, 2], largest component first
        rank = y.argsort().argsort().double() / max(1, len(y) - 1)  # 0 = the most frequent token
        some = torch.randperm(len(y), generator=g)[:TABLE_TOKENS].to(X.device)
        held = torch.randperm(len(test), generator=g)[:TABLE_TOKENS].to(X.device)
        return {"frequency/pca": Table(["pc1", "pc2", "frequency rank"],
                                       torch.stack([pcs[some, 0], pcs[some, 1], rank[some]], 1).tolist()),
                "frequency/fit": Table(["actual -log f", "predicted -log f"],
                                       torch.stack([actual[held], pred[held]], 1).tolist())}

    @classmethod
    def figures(cls, plot: RunPlot) -> list[Figure]:
        history = plot.history

        def pca(ax) -> bool:
            entries = history.table("frequency/pca")
            if not entries:
                return False
            rows = entries[-1]["rows"]
            points = ax.scatter([r[0] for r in rows], [r[1] for r in rows], c=[r[2] for r in rows], cmap="viridis_r",
                                s=6)
            ax.figure.colorbar(points, ax=ax).set_label("frequency rank (0 = most frequent)", fontsize=8)
            ax.set(xlabel="PC 1", ylabel="PC 2")
            ax.set_title(f"unembedding rows, first two PCs (step {entries[-1]['step']})", fontsize=10)
            return True

        def fit(ax) -> bool:
            entries = history.table("frequency/fit")
            if not entries:
                return False
            rows = entries[-1]["rows"]
            ax.scatter([r[0] for r in rows], [r[1] for r in rows], s=6, alpha=0.6)
            lo, hi = min(min(r) for r in rows), max(max(r) for r in rows)
            ax.plot([lo, hi], [lo, hi], color="crimson", linewidth=1)
            ax.set(xlabel="actual −log frequency", ylabel="predicted from the output embedding")
            ax.set_title(f"held-out tokens, R² = {history.last('frequency/r2_corpus'):.3f} "
                         f"(step {entries[-1]['step']})", fontsize=10)
            ax.grid(alpha=0.3)
            return True

        def settles(ax) -> bool:
            if not plot.series("frequency/dist_to_final")[0]:  # online, per-interval changes follow the LR
                return plot.leave_out("“the encoding settles before the weights do”: drawn offline only, against "
                                      "the final checkpoint (dynascope analyze)")
            drawn = plot.two_scales(ax, {"R² (corpus frequency)": plot.series("frequency/r2_corpus")},
                                    ("‖E − E_final‖ / ‖E_final‖", plot.series("frequency/dist_to_final")),
                                    "the encoding settles before the weights do", "R²")
            plot.mark(ax, history.summary.get("frequency/converged_step"), "converged")
            return drawn

        def deletion(ax) -> bool:
            entries = history.table("frequency/deletion_curve")
            if not entries:
                return False
            entry = entries[-1]
            for i, (label, marker) in enumerate(zip(entry["columns"][1:], "os^", strict=False), start=1):
                ax.plot([r[0] for r in entry["rows"]], [max(r[i], 1e-6) for r in entry["rows"]], marker=marker,
                        label=label.removeprefix("KL, "))
            ax.set_yscale("log")
            ax.set(xlabel="fraction of dimensions deleted", ylabel="mean KL (nats)")
            ax.set_title(f"dimension deletion (step {entry['step']})", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, framealpha=0.7)
            return True

        return [fig for fig in [plot.row([pca, fit]), plot.row([settles, deletion])] if fig is not None]
