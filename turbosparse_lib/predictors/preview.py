"""A predictor built from the FFN's own weights: a low-rank preview of dReLU's two pre-activations.

A dReLU neuron fires exactly when both its gate and its up pre-activation are positive, and each is a linear function
of the FFN's normalised input: ``g = x W_gate^T``, ``u = x W_up^T``. A low-rank MLP predictor (``predictors.model``,
PowerInfer / Deja Vu) learns that boundary from labels alone. The preview starts from the answer instead:

- ``[g, u] ~ x A B + b`` with ``A`` (H, r) and ``B`` (r, 2N): the best rank-``r`` approximation of both
  pre-activations in the metric of the captured inputs (minimising ``E ||x A B - x [W_gate; W_up]^T||^2``: the SVD
  of ``L^T [W_gate; W_up]^T``, where ``L L^T`` is the inputs' second-moment matrix). It needs no training.
- Each neuron's residual ``g - g_hat`` has a spread ``sigma`` (fitted on the same inputs), so the preview gives a
  probability: ``P(fires) = Phi(g_hat / sigma_g) Phi(u_hat / sigma_u)`` (errors treated as independent Gaussians).
  A neuron with a large contribution has both pre-activations far above zero, so it is kept with near certainty;
  the ones the preview is unsure of sit near zero and carry little.
- ``predictors.train`` then tunes ``A``, ``B``, ``b`` and ``sigma`` with the same loss as the MLP predictors.

``forward`` returns the logit of that probability, so thresholds, operating points and ``PredictedMask`` treat both
kinds alike. At equal parameters (``equal_parameter_rank``) the preview keeps more of the live neurons' contribution
than the low-rank MLP at every predicted sparsity (notebook 07). It reads the normalised FFN input (captures with
``source="normed"``) and only fits dReLU, where both branches are rectified.
"""

from __future__ import annotations

import torch
from torch import nn


def equal_parameter_rank(mlp_rank: int, hidden: int, intermediate: int) -> int:
    """The preview rank with as many parameters as a low-rank MLP predictor of ``mlp_rank``: the MLP has
    ``r (H + N) + N``, the preview ``r (H + 2 N) + 4 N``."""
    mlp = mlp_rank * (hidden + intermediate) + intermediate
    return max(1, round((mlp - 4 * intermediate) / (hidden + 2 * intermediate)))


def firing_log_probs(z_g: torch.Tensor, z_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``g_hat / sigma_g`` and ``u_hat / sigma_u`` -> (log P(fires), log P(silent)), with
    ``P(fires) = Phi(z_g) Phi(z_u)``."""
    log_p = torch.special.log_ndtr(z_g) + torch.special.log_ndtr(z_u)
    log_q = torch.log(-torch.expm1(log_p).clamp_max(-torch.finfo(log_p.dtype).tiny))
    return log_p, log_q


def firing_logits(z_g: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
    """The logit of ``Phi(z_g) Phi(z_u)``: what the module returns and the engine's provider compares."""
    log_p, log_q = firing_log_probs(z_g, z_u)
    return log_p - log_q


class PreactivationPreview(nn.Module):
    """``x (..., H) -> logits (..., N)`` of each dReLU neuron firing, from a rank-``rank`` preview of its gate and
    up pre-activations (see the module docstring)."""

    def __init__(self, hidden: int, intermediate: int, rank: int):
        super().__init__()
        if not 1 <= rank <= hidden:
            raise ValueError(f"rank must be in [1, hidden={hidden}]; got {rank}")
        self.intermediate = intermediate
        self.down = nn.Linear(hidden, rank, bias=False)  # A^T (rank, hidden)
        self.up = nn.Linear(rank, 2 * intermediate, bias=True)  # B^T (2N, rank): gate rows, then up rows
        self.log_sigma = nn.Parameter(torch.zeros(2 * intermediate))  # the residual's spread, per pre-activation

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_hat / sigma_g, u_hat / sigma_u), each (..., N)."""
        z = self.up(self.down(x)) * torch.exp(-self.log_sigma)
        return z[..., : self.intermediate], z[..., self.intermediate :]

    def log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P(fires), log P(silent)), each (..., N)."""
        return firing_log_probs(*self.scores(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return firing_logits(*self.scores(x))

    @classmethod
    @torch.no_grad()
    def fit(cls, x_TH: torch.Tensor, w_gate_NH: torch.Tensor, w_up_NH: torch.Tensor, rank: int) -> PreactivationPreview:
        """The preview of ``w_gate_NH`` and ``w_up_NH`` on inputs ``x_TH`` (the normalised FFN inputs it will see)."""
        n, h = w_gate_NH.shape
        if w_up_NH.shape != (n, h) or x_TH.ndim != 2 or x_TH.shape[1] != h:
            raise ValueError(f"shapes do not match: x {tuple(x_TH.shape)}, gate {(n, h)}, up {tuple(w_up_NH.shape)}")
        x = x_TH.double()
        w = torch.cat([w_gate_NH, w_up_NH]).double()  # (2N, H)
        moment = x.T @ x / len(x)
        ridge = 1e-6 * moment.diagonal().mean() * torch.eye(h, dtype=torch.float64)  # a direction never seen
        chol = torch.linalg.cholesky(moment + ridge)
        u, s, vh = torch.linalg.svd(chol.T @ w.T, full_matrices=False)
        a = torch.linalg.solve_triangular(chol.T, u[:, :rank], upper=True)  # (H, r) = L^-T U_r
        b = s[:rank, None] * vh[:rank]  # (r, 2N)
        net = cls(h, n, rank)
        net.down.weight.copy_(a.T.float())
        net.up.weight.copy_(b.T.float())
        net.up.bias.zero_()
        # the residual x (W^T - A B) per pre-activation: its sample spread from the inputs' moments, without the
        # (T, 2N) matrix itself (T x 28,672 doubles at Mistral-7B's width)
        miss = w.T - a @ b  # (H, 2N)
        mean = x.mean(0) @ miss
        var = (((moment @ miss) * miss).sum(0) - mean.square()) * len(x) / max(1, len(x) - 1)
        net.log_sigma.copy_(var.clamp_min(0).sqrt().clamp_min(1e-6).log().float())
        return net.eval()

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A^T (r, H), B^T / sigma (2N, r), b / sigma (2N,)) in float32: the matrices a decode engine reads,
        ``z = (B^T / sigma) (A^T x) + b / sigma`` giving ``scores`` in one pass."""
        inv = torch.exp(-self.log_sigma.detach().float())
        return (
            self.down.weight.detach().float().contiguous(),
            (self.up.weight.detach().float() * inv[:, None]).contiguous(),
            (self.up.bias.detach().float() * inv).contiguous(),
        )
