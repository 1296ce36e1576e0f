"""An SVD preview of the output layer (SVD-softmax, Shim et al., NeurIPS 2017): the comparison for the clusters of
``output_layer``, scored with the same columns and the same byte rule.

The lm_head is rotated by its SVD, ``W = B @ basis`` with ``B = U S`` (V, H) and ``basis = Vt`` (H, H), so
``W h = B (basis h)`` exactly. A token reads the first ``rank`` columns of every row (a preview of all V logits),
then the remaining columns of the ``top_n`` rows the preview ranks highest (their exact logits). Every other row
keeps its preview logit: an estimate of the tail rather than a floor. It works when the leading singular
directions carry most of every logit, which depends on the matrix's spectrum (notebook 07 measures it). Bytes per
token: ``V * rank + top_n * (H - rank)`` weights and the H x H basis (``output_layer.bytes_fraction_in_format``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from .output_layer import bytes_fraction_in_format, check_matrix, full_logit_stats

METHOD = "svd preview"


@dataclass(eq=False, repr=False)
class SVDPreview:
    """The rotated lm_head and its basis (see the module docstring)."""

    basis_HH: torch.Tensor  # float32, orthonormal rows: the right singular vectors
    rotated_VH: torch.Tensor  # float32, U S: columns in decreasing singular value

    @classmethod
    def fit(cls, lm_head_VH: torch.Tensor) -> SVDPreview:
        check_matrix("lm_head_VH", lm_head_VH)
        U, S, Vt = torch.linalg.svd(lm_head_VH.double(), full_matrices=False)
        return cls(Vt.float().contiguous(), (U * S).float().contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rotated_VH.shape)

    def logits(self, hidden_TH: torch.Tensor, rank: int, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_TV, refined_TN)``: preview logits from the first ``rank`` columns, exact ones on the
        ``top_n`` rows the preview ranks first (``refined_TN``)."""
        z_TH = hidden_TH.float() @ self.basis_HH.T
        return self._refine(z_TH, z_TH @ self.rotated_VH.T, rank, top_n)

    def _refine(self, z_TH, exact_TV, rank: int, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The preview of rotated states ``z_TH`` with the refined rows taken from ``exact_TV``. The exact values
        come from one full product, computed once per token for every setting; a kernel would read only the
        refined rows' remaining columns, which is what the byte rule counts."""
        V, H = self.shape
        if not (1 <= rank <= H and 1 <= top_n <= V):
            raise ValueError(f"need 1 <= rank <= {H} and 1 <= top_n <= {V}; got rank={rank}, top_n={top_n}")
        preview_TV = z_TH[:, :rank] @ self.rotated_VH[:, :rank].T
        refined_TN = preview_TV.topk(top_n, dim=1).indices
        return preview_TV.scatter(1, refined_TN, exact_TV.gather(1, refined_TN)), refined_TN


@torch.no_grad()
def evaluate_svd(
    preview: SVDPreview,
    hidden_TH: torch.Tensor,
    lm_head_VH: torch.Tensor,
    targets_T: torch.Tensor,
    valid_T: torch.Tensor | None = None,
    ranks: Sequence[int] = (32, 64, 128),
    top_ns: Sequence[int] = (256, 1024),
    weight_bytes: float = 4.0,
    chunk: int = 256,
) -> pd.DataFrame:
    """``output_layer.evaluate``'s columns for the SVD preview, one row per (rank, top_n): top-1 agreement, whether
    the target was refined (``target_in_candidates``), perplexities and their paired ratio, rows read in full
    (``top_n``) and bytes over the full lm_head's."""
    if preview.shape != tuple(lm_head_VH.shape):
        raise ValueError(
            f"the preview was fitted on an lm_head of shape {preview.shape}, not {tuple(lm_head_VH.shape)}"
        )
    valid_T = torch.ones(len(hidden_TH), dtype=torch.bool) if valid_T is None else torch.as_tensor(valid_T).bool()
    hidden_TH, targets_T = hidden_TH[valid_T].float(), torch.as_tensor(targets_T, dtype=torch.long)[valid_T]
    full = full_logit_stats(hidden_TH, lm_head_VH.float(), targets_T, chunk)
    nll_full_T = (full["lse"] - full["target"]).double()
    settings = [(rank, top_n) for rank in ranks for top_n in top_ns]
    nll, top, hit = ({s: [] for s in settings} for _ in range(3))
    for h_TH, t_T in zip(hidden_TH.split(chunk), targets_T.split(chunk)):
        z_TH = h_TH @ preview.basis_HH.T
        exact_TV = z_TH @ preview.rotated_VH.T  # once per chunk, shared by every setting
        for s in settings:
            logits_TV, refined_TN = preview._refine(z_TH, exact_TV, *s)
            nll[s].append(torch.logsumexp(logits_TV, 1) - logits_TV.gather(1, t_T[:, None])[:, 0])
            top[s].append(logits_TV.argmax(1))
            hit[s].append((refined_TN == t_T[:, None]).any(1))
    V, H = preview.shape
    rows = []
    for rank, top_n in settings:
        nll_T = torch.cat(nll[rank, top_n]).double()
        rows.append(
            {
                "method": METHOD,
                "rank": rank,
                "top_n": top_n,
                "tokens": len(nll_T),
                "top1_agreement": (torch.cat(top[rank, top_n]) == full["top"]).double().mean().item(),
                "target_in_candidates": torch.cat(hit[rank, top_n]).double().mean().item(),
                "ppl_full": math.exp(nll_full_T.mean().item()),
                "ppl_sparse": math.exp(nll_T.mean().item()),
                "ppl_ratio": math.exp((nll_T - nll_full_T).mean().item()),
                "fallback_rate": 0.0,
                "rows_read_fraction": top_n / V,
                "bytes_fraction": bytes_fraction_in_format(
                    {"method": METHOD, "rank": rank, "top_n": top_n}, V, H, weight_bytes
                ),
            }
        )
    return pd.DataFrame(rows)
