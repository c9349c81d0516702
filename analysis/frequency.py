"""`frequency`: how linearly the unembedding encodes token frequency, and when that encoding settles.

Cho et al. 2025, "Understanding Token Probability Encoding in Output Embeddings": −log of a token's
probability is close to a shared linear function of its output embedding, −log α_w ≈ A·E[w] + B
(E the unembedding [V, d], row w the output embedding of token w).
Fitted here by ridge-stabilised least squares in float64 (λ = 1e-3, centred), on 80% of the tokens
(seeded split) and scored on the held-out 20%:

- `frequency/r2_corpus`, `frequency/spearman_corpus`: target −log(corpus frequency) from the run's
  training-split counts (`counts.npy`), tokens with count ≥ `min_count` (default 10); padded rows
  (beyond the tokenizer) and rarely seen tokens are excluded.
- `frequency/r2_output`: target −log of the mean output probability over the probe positions.
- With an LM-head bias b, the target becomes y + b (the bias carries frequency itself; spec pitfall 3).
- Sparsity of the fitted direction A (from the corpus fit): `frequency/effective_dims` = (Σ|A|)²/ΣA²,
  and `frequency/deletable_frac_0.01` / `_0.1`: the largest fraction ρ (steps of 1/20) of dimensions,
  smallest |A_d| first, whose zero-ablation in the final-norm output keeps the mean KL on the probe
  positions below 0.01 / 0.1 nats.
- Link to outlier dimensions: `frequency/cos_A_mean_h` = cos(A, −mean h) (theory: A ≈ −h̄), and
  `frequency/od_overlap`: the fraction of the top-|A| dimensions (as many as there are ODs, else 1% of
  d) that are outlier dimensions by the rule of `outliers.py`. h is the final-norm output at every
  `position_stride`-th probe position after the first `skip_positions` (16), the positions the
  outliers analysis uses, so early-position massive activations do not set the threshold.
- Convergence: `frequency/direction_cos_prev` (cosine of A with the previous checkpoint's A) beside
  `frequency/wu_rel_change` = ‖E_t − E_prev‖ / ‖E_t‖, so the curves show whether the encoding settles
  before the weights do. `frequency/converged_step` in the summary: the first checkpoint with
  r2_corpus ≥ `r2_fraction` (0.9) × its running maximum and direction_cos_prev ≥ `cos_threshold` (0.95).
  Departure: r2_corpus must also reach `min_r2` (0.5); without it the rule fires in the first steps,
  where the weights (so A) barely move and the running maximum of a near-zero R² is itself near zero.

Tied embeddings: E is then also the input embedding, so the frequency code is pushed from both
ends and lives in the inputs too; the fit is the same, on the shared matrix. The target α of paper B
is our `r2_output`; which inputs paper B averaged over was not retrievable (spec §7).
"""

from __future__ import annotations

import torch
from torchmetrics.utilities import dim_zero_cat

from dynascope.analysis.base import Analysis, AnalysisContext, Result
from dynascope.analysis.outliers import ablation_metrics, outlier_dims, spearman
from dynascope.analysis.view import Cache, ModelShape


def ridge_fit(X: torch.Tensor, y: torch.Tensor, lam: float = 1e-3, holdout: float = 0.2,
              seed: int = 0) -> tuple[torch.Tensor, float, float, float]:
    """(A, B, held-out R², held-out Spearman) of y ≈ X·A + B, in float64."""
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
    return A, B, r2.item(), spearman(pred, y[test])


class Frequency(Analysis):
    name = "frequency"
    headline = "frequency/r2_corpus"
    carry = ("prev_A", "prev_W", "best_r2", "converged_step")

    def __init__(self, shape: ModelShape, context: AnalysisContext, min_count: int = 10, position_stride: int = 4,
                 skip_positions: int = 16, r2_fraction: float = 0.9, cos_threshold: float = 0.95, min_r2: float = 0.5,
                 seed: int = 0):
        super().__init__(shape, context)
        self.min_count, self.position_stride, self.seed = min_count, position_stride, seed
        self.skip_positions = skip_positions
        self.r2_fraction, self.cos_threshold, self.min_r2 = r2_fraction, cos_threshold, min_r2
        self.add_state("prob_sum", torch.zeros(shape.vocab_size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_positions", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("h", default=[], dist_reduce_fx="cat")
        self.prev_A: torch.Tensor | None = None
        self.prev_W: torch.Tensor | None = None
        self.best_r2 = float("-inf")
        self.converged_step: int | None = None

    def hook_names(self) -> list[str]:
        return ["ln_final.hook_normalized"]

    def update(self, tokens: torch.Tensor, logits: torch.Tensor, cache: Cache, windows: torch.Tensor) -> None:
        self.prob_sum += logits.float().softmax(-1).flatten(0, 1).sum(0).double()
        self.n_positions += tokens.numel()
        start = min(self.skip_positions, tokens.shape[1] - 1)  # the outliers analysis's positions, thinned
        self.h.append(cache["ln_final.hook_normalized"][:, start::self.position_stride].flatten(0, 1).float())

    def compute(self) -> Result:
        W = self.view.output_embeddings.detach().double()
        b = self.view.output_bias
        b = None if b is None else b.detach().double()
        h = dim_zero_cat(self.h)
        out: dict[str, float] = {}
        carry: dict = {"prev_W": W.float().detach().clone()}
        y_out = -(self.prob_sum / self.n_positions).clamp_min(1e-30).log()
        _, _, out["frequency/r2_output"], _ = ridge_fit(W, y_out + (0 if b is None else b), seed=self.seed)
        counts = self.context.counts
        if counts is not None:
            counts = counts.to(device=W.device, dtype=torch.float64)
            keep = torch.zeros(len(W), dtype=torch.bool, device=W.device)
            keep[:len(counts)] = counts[:len(W)] >= self.min_count
            y = -(counts[:len(W)] / counts.sum()).log()
            y = torch.cat([y, torch.zeros(len(W) - len(y), dtype=y.dtype, device=y.device)])
            y = y + (0 if b is None else b)
            A, _, r2, rho = ridge_fit(W[keep], y[keep], seed=self.seed)
            A32 = A.float()
            out |= {"frequency/r2_corpus": r2, "frequency/spearman_corpus": rho} | self._direction(A32, h)
            carry |= {"prev_A": A32.detach().clone()} | self._convergence(r2, out.get("frequency/direction_cos_prev"))
        if self.prev_W is not None:
            W32 = W.float()
            out["frequency/wu_rel_change"] = ((W32 - self.prev_W.to(W32.device)).norm() / W32.norm()).item()
        step = carry.get("converged_step", self.converged_step)
        return Result(out, summary={} if step is None else {"frequency/converged_step": float(step)}, carry=carry)

    def _direction(self, A32: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
        out = {"frequency/effective_dims": (A32.abs().sum() ** 2 / A32.pow(2).sum()).item(),
               "frequency/cos_A_mean_h": torch.cosine_similarity(A32, -h.mean(0), dim=0).item()}
        ods, _, _ = outlier_dims(h)
        d = len(A32)
        k = len(ods) or max(1, d // 100)
        top = set(A32.abs().topk(k).indices.tolist())
        out["frequency/od_overlap"] = len(top & set(ods.tolist())) / k
        out |= self._deletable(A32, h)
        if self.prev_A is not None:
            out["frequency/direction_cos_prev"] = torch.cosine_similarity(A32, self.prev_A.to(A32.device), dim=0).item()
        return out

    def _convergence(self, r2: float, cos: float | None) -> dict:
        best = max(self.best_r2, r2)
        step = self.converged_step
        if (step is None and cos is not None and r2 >= max(self.min_r2, self.r2_fraction * best)
                and cos >= self.cos_threshold):
            step = self.step
        return {"best_r2": best, "converged_step": step}

    def _deletable(self, A: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
        order = A.abs().argsort()  # least important first
        fractions = [i / 20 for i in range(1, 20)]
        drops = [order[: int(f * len(A))] for f in fractions]
        kls = [m["kl"] for m in ablation_metrics(self.view, h, None, drops)]
        return {f"frequency/deletable_frac_{tau}": max([f for f, kl in zip(fractions, kls, strict=True) if kl < tau],
                                                        default=0.0) for tau in (0.01, 0.1)}
