"""A sparse output layer: per token, logits for a few candidate vocabulary rows instead of the whole lm_head.

FFN sparsity never touches the output matrix, which in a small model with a large vocabulary is a large share of
the bytes read per token (SmolLM2-135M: 49,152 x 576, about a fifth of the model). Following "Learning to Screen"
(Chen et al., NeurIPS 2018), and like SmallThinker, which also pre-selects the lm_head rows it computes:

- cluster the context vectors (the final-normed hidden states the lm_head multiplies) with spherical k-means;
- give each cluster the vocabulary rows carrying the most softmax probability mass among the top tokens of the
  calibration contexts assigned to it;
- at inference compute exact logits on the token's cluster's rows only; every other row gets the smallest candidate
  logit, a floor that reads nothing more, so the result is still a distribution over the whole vocabulary and
  perplexity stays defined;
- when the largest softmax probability among the candidates (renormalised over them) is below a confidence
  threshold, the token falls back to the full lm_head.

Shape suffixes: T tokens, H hidden size, V vocabulary rows, C clusters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..atomic import atomic_path, write_json

TENSORS_FILE = "output_candidates.safetensors"
CONFIG_FILE = "output_candidates.json"
FORMAT_VERSION = 1
IGNORE_TARGET = -100  # transformers' ignore index: using it as an index fails loudly instead of scoring a token
CENTROID_BYTES = 4  # the centroids stay float32 whatever the lm_head's format: they are C x H, not V x H


# ----------------------------------------------------------------------------------------------------- hidden states
def lm_head_weight(model) -> torch.Tensor:
    """(V, H) float32 copy of a causal LM's output matrix (tied or not). Refuses an lm_head with a bias, which
    ``hidden @ W.T`` would leave out."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError(f"{type(model).__name__}'s lm_head has a bias; the sparse output layer assumes none")
    return head.weight.detach().float().cpu()


@torch.no_grad()
def final_hidden_states(
    model, token_ids, context_length: int, batch_size: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states the lm_head multiplies, over disjoint windows of ``context_length`` of ``token_ids``.

    Returns ``(hidden_TH float32, targets_T int64, valid_T bool)`` on the CPU: position t of a window predicts token
    t+1 of the same window; the last position of each window has none, so it is not valid and its target is -100.
    Only the base model runs (its ``last_hidden_state`` is final-normed in Llama-like families), so no T x V logits
    are built. Families that scale their logits (Gemma's soft-capping, Granite's ``logits_scaling``) need it on top.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).cpu()
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence of token ids; got shape {tuple(ids.shape)}")
    if context_length < 1 or batch_size < 1:
        raise ValueError(f"context_length and batch_size must be >= 1; got {context_length} and {batch_size}")
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    device = next(model.parameters()).device
    n_full = len(ids) // context_length
    # equal windows batch without padding or attention masks; only the shorter last one runs alone
    batches = list(ids[: n_full * context_length].view(n_full, context_length).split(batch_size)) if n_full else []
    if len(ids) % context_length:
        batches.append(ids[n_full * context_length :][None])
    was_training = model.training
    model.eval()
    try:
        outs = [base(input_ids=b.to(device)).last_hidden_state.float().cpu() for b in batches]
    finally:
        model.train(was_training)
    hidden_TH = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
    pos_T = torch.arange(len(ids))
    last_T = (pos_T % context_length == context_length - 1) | (pos_T == len(ids) - 1)
    targets_T = torch.cat([ids[1:], ids.new_full((1,), IGNORE_TARGET)])
    targets_T[last_T] = IGNORE_TARGET
    return hidden_TH, targets_T, ~last_T


# ---------------------------------------------------------------------------------------------- spherical k-means
def check_matrix(name: str, x, hidden_size: int | None = None) -> None:
    """Refuse anything but a non-empty 2-D tensor (with ``hidden_size`` columns when given), saying what it was."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty 2-D tensor; got {shape}")
    if hidden_size is not None and x.shape[1] != hidden_size:
        raise ValueError(f"{name} has {x.shape[1]} columns but the hidden size is {hidden_size}: shapes disagree")


def nearest_centroid(x_TH: torch.Tensor, centroids_CH: torch.Tensor, chunk: int = 4096):
    """(cluster_T, similarity_T): the argmax of ``x @ centroids.T`` (ties go to the lower cluster), chunked over T
    so that T x C never has to fit at once."""
    best, sims = [], []
    for x in x_TH.split(chunk):
        s, i = (x.float() @ centroids_CH.T).max(dim=1)
        best.append(i)
        sims.append(s)
    return torch.cat(best), torch.cat(sims)


def _update_centroids(x_TH, clusters_T, sim_T, n_clusters: int) -> torch.Tensor:
    sums_CH = torch.zeros(n_clusters, x_TH.shape[1]).index_add_(0, clusters_T, x_TH)
    centroids_CH = sums_CH / sums_CH.norm(dim=1, keepdim=True).clamp_min(1e-12)
    empty = (torch.bincount(clusters_T, minlength=n_clusters) == 0).nonzero().flatten()
    if len(empty):
        # an empty cluster restarts on the points its neighbours fit worst (stable sort: deterministic)
        farthest = torch.sort(sim_T, stable=True).indices[: len(empty)]
        centroids_CH[empty] = x_TH[farthest]
    return centroids_CH


def spherical_kmeans(hidden_TH: torch.Tensor, n_clusters: int, iterations: int = 20, seed: int = 0, chunk: int = 4096):
    """k-means on the unit sphere (cosine similarity), deterministic for a seed.

    Starts from ``n_clusters`` distinct points drawn with a ``torch.Generator`` seeded by ``seed``; stops early when
    no assignment changes. Returns ``(centroids_CH unit rows, clusters_T, info)``, the clusters being the nearest
    centroid of each point under the returned centroids; ``info`` has ``kmeans_iterations`` and ``converged``.
    """
    x_TH = hidden_TH.float() / hidden_TH.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    centroids_CH = x_TH[torch.randperm(len(x_TH), generator=generator)[:n_clusters]].clone()
    clusters_T, sim_T = nearest_centroid(x_TH, centroids_CH, chunk)
    run, converged = 0, False
    while run < iterations and not converged:
        centroids_CH = _update_centroids(x_TH, clusters_T, sim_T, n_clusters)
        run += 1
        new_T, sim_T = nearest_centroid(x_TH, centroids_CH, chunk)
        converged = torch.equal(new_T, clusters_T)
        clusters_T = new_T
    return centroids_CH, clusters_T, {"kmeans_iterations": run, "converged": converged}


# --------------------------------------------------------------------------------------------------- candidates
def _probability_mass(hidden_TH, lm_head_VH, clusters_T, n_clusters: int, top_k: int, chunk: int) -> torch.Tensor:
    """(C, V) float64: per cluster, the softmax probability of each token summed over the contexts where it is among
    the top_k. Logits are built ``chunk`` contexts at a time: T x V at once would not fit at real sizes."""
    V = lm_head_VH.shape[0]
    mass = torch.zeros(n_clusters * V, dtype=torch.float64)
    for h_TH, c_T in zip(hidden_TH.split(chunk), clusters_T.split(chunk)):
        logits_TV = h_TH @ lm_head_VH.T
        top_TK, idx_TK = logits_TV.topk(top_k, dim=1)
        p_TK = torch.exp(top_TK - torch.logsumexp(logits_TV, dim=1, keepdim=True))
        mass.index_add_(0, (c_T[:, None] * V + idx_TK).flatten(), p_TK.flatten().double())
    return mass.view(n_clusters, V)


def _largest_mass_rows(mass_CV: torch.Tensor, rows_per_cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets_C1, rows): each cluster's ``rows_per_cluster`` tokens of largest mass (fewer if fewer were ever
    seen), sorted ascending. A stable sort breaks ties by token id, so a fit is reproducible."""
    order_CV = torch.sort(mass_CV, dim=1, descending=True, stable=True).indices
    kept_C = (mass_CV > 0).sum(dim=1).clamp(max=rows_per_cluster)
    rows = [order_CV[c, :k].sort().values for c, k in enumerate(kept_C.tolist())]
    offsets_C1 = torch.cat([torch.zeros(1, dtype=torch.long), kept_C.cumsum(0)])
    return offsets_C1, torch.cat(rows)


def _check_fit_args(hidden_TH, lm_head_VH, n_clusters, rows_per_cluster, top_k, iterations, chunk) -> None:
    check_matrix("hidden_TH", hidden_TH)
    check_matrix("lm_head_VH", lm_head_VH, hidden_TH.shape[1])
    (T, _), V = hidden_TH.shape, lm_head_VH.shape[0]
    if not 1 <= n_clusters <= T:
        raise ValueError(
            f"n_clusters={n_clusters} must be in [1, {T}] (T, the calibration tokens): "
            "pass more tokens or ask for fewer clusters"
        )
    if not 1 <= rows_per_cluster <= V:
        raise ValueError(f"rows_per_cluster={rows_per_cluster} must be in [1, V={V}]")
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k={top_k} must be in [1, V={V}]")
    if iterations < 0 or chunk < 1:
        raise ValueError(f"iterations must be >= 0 and chunk >= 1; got {iterations} and {chunk}")
    if not torch.isfinite(hidden_TH).all():
        raise ValueError("hidden_TH has NaN or infinite values: the hidden states were not captured cleanly")


@dataclass(eq=False, repr=False)
class OutputCandidates:
    """Cluster centroids of the context vectors and the candidate vocabulary rows of each cluster.

    Cluster c's candidates are ``rows[offsets_C1[c]:offsets_C1[c + 1]]``, sorted ascending (``cluster_rows(c)``).
    """

    centroids_CH: torch.Tensor  # float32, unit rows
    offsets_C1: torch.Tensor  # int64, C + 1 offsets into rows
    rows: torch.Tensor  # int64 vocabulary rows, cluster after cluster
    vocab_size: int
    hidden_size: int
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"OutputCandidates(clusters={self.n_clusters}, mean_rows={self.mean_rows:.1f}, "
            f"vocab_size={self.vocab_size}, hidden_size={self.hidden_size})"
        )

    @property
    def n_clusters(self) -> int:
        return self.centroids_CH.shape[0]

    @property
    def cluster_sizes_C(self) -> torch.Tensor:
        return self.offsets_C1.diff()

    @property
    def mean_rows(self) -> float:
        return len(self.rows) / max(self.n_clusters, 1)

    def cluster_rows(self, c: int) -> torch.Tensor:
        return self.rows[self.offsets_C1[c] : self.offsets_C1[c + 1]]

    @classmethod
    def fit(
        cls,
        hidden_TH: torch.Tensor,
        lm_head_VH: torch.Tensor,
        n_clusters: int,
        rows_per_cluster: int,
        top_k: int = 32,
        iterations: int = 20,
        seed: int = 0,
        chunk: int = 2048,
    ) -> OutputCandidates:
        """Cluster the calibration contexts (spherical k-means) and collect each cluster's candidate rows: the
        ``rows_per_cluster`` tokens of largest summed probability among its contexts' ``top_k`` tokens."""
        _check_fit_args(hidden_TH, lm_head_VH, n_clusters, rows_per_cluster, top_k, iterations, chunk)
        hidden_TH, lm_head_VH = hidden_TH.float(), lm_head_VH.float()
        centroids_CH, _, info = spherical_kmeans(hidden_TH, n_clusters, iterations, seed, chunk)
        # the clusters of the raw states, exactly as ``assign`` will see them at inference
        clusters_T = nearest_centroid(hidden_TH, centroids_CH, chunk)[0]
        mass_CV = _probability_mass(hidden_TH, lm_head_VH, clusters_T, n_clusters, top_k, chunk)
        offsets_C1, rows = _largest_mass_rows(mass_CV, rows_per_cluster)
        meta = dict(tokens=len(hidden_TH), clusters=n_clusters, rows_per_cluster=rows_per_cluster, top_k=top_k)
        meta.update(iterations=iterations, seed=seed, **info)
        return cls(centroids_CH, offsets_C1, rows, lm_head_VH.shape[0], hidden_TH.shape[1], meta).validate()

    def validate(self) -> OutputCandidates:
        """Raise ValueError unless the fields agree with one another; returns self."""
        C, V, n = self.n_clusters, self.vocab_size, len(self.rows)
        problems = []
        if self.centroids_CH.dtype != torch.float32 or tuple(self.centroids_CH.shape) != (C, self.hidden_size):
            problems.append(f"centroids_CH is {self.centroids_CH.dtype} {tuple(self.centroids_CH.shape)}")
        if self.offsets_C1.dtype != torch.long or self.rows.dtype != torch.long or self.rows.ndim != 1:
            problems.append(f"offsets_C1 and rows must be 1-D int64; got {self.offsets_C1.dtype} and {self.rows.dtype}")
        elif tuple(self.offsets_C1.shape) != (C + 1,) or self.offsets_C1[0] != 0 or self.offsets_C1[-1] != n:
            problems.append(f"offsets_C1 must run from 0 to {n} in {C + 1} steps")
        elif (self.offsets_C1.diff() < 0).any() or (n and (self.rows.min() < 0 or self.rows.max() >= V)):
            problems.append(f"offsets_C1 must not decrease and rows must lie in [0, {V})")
        else:
            increasing = self.rows.diff() > 0
            starts = self.offsets_C1[1:-1]
            increasing[starts[(starts > 0) & (starts < n)] - 1] = True  # a new cluster may start lower
            if not increasing.all():
                problems.append("each cluster's rows must be sorted ascending without repeats")
        if problems:
            raise ValueError("inconsistent OutputCandidates: " + "; ".join(problems))
        return self

    def assign(self, hidden_TH: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(T,) int64 cluster of each context: argmax of ``h @ centroids.T``, cosine up to |h|, which does not move
        the argmax."""
        check_matrix("hidden_TH", hidden_TH, self.hidden_size)
        return nearest_centroid(hidden_TH, self.centroids_CH, chunk)[0]

    def n_params(self) -> int:
        """Weights the selector adds: the C x H centroids (the candidate lists are indices into the lm_head)."""
        return self.centroids_CH.numel()

    def selector_bytes(self) -> int:
        """Bytes of centroids every token reads to find its cluster (float32)."""
        return self.centroids_CH.numel() * CENTROID_BYTES

    def full_bytes(self, bytes_per_weight: float = 4.0) -> float:
        """Bytes of the whole lm_head in its own format: what a dense output layer reads per token."""
        return self.vocab_size * self.hidden_size * bytes_per_weight

    def bytes_read(self, rows_read_T: torch.Tensor, bytes_per_weight: float = 4.0) -> torch.Tensor:
        """(T,) float64 bytes each token reads: the centroids, plus its rows in the lm_head's format (a fallback
        token's ``rows_read`` is V). The row indices (4 bytes a row) are left out: H times smaller than the rows."""
        return self.selector_bytes() + rows_read_T.double() * self.hidden_size * bytes_per_weight

    def save(self, directory: str | Path) -> Path:
        """Write ``output_candidates.safetensors`` then ``output_candidates.json`` into ``directory``, each
        atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {"centroids_CH": self.centroids_CH, "offsets_C1": self.offsets_C1, "rows": self.rows}
        with atomic_path(directory / TENSORS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        sizes = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_clusters=self.n_clusters)
        write_json(
            directory / CONFIG_FILE, {"format": FORMAT_VERSION, **sizes, "n_rows": len(self.rows), "meta": self.meta}
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected: Sequence[int] | torch.Tensor | None = None) -> OutputCandidates:
        """The candidates saved in ``directory``; with ``expected`` (an lm_head or its (V, H) shape) they must have
        been fitted for that shape."""
        directory = Path(directory)
        missing = [name for name in (TENSORS_FILE, CONFIG_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"no sparse output layer in {directory}: {', '.join(missing)} missing; fit one "
                "(OutputCandidates.fit) and save it there"
            )
        cfg, tensors = _read_files(directory)
        obj = cls(
            tensors["centroids_CH"],
            tensors["offsets_C1"],
            tensors["rows"],
            int(cfg["vocab_size"]),
            int(cfg["hidden_size"]),
            dict(cfg.get("meta") or {}),
        )
        if (obj.n_clusters, len(obj.rows)) != (cfg["n_clusters"], cfg["n_rows"]):
            raise ValueError(
                f"{directory}: the tensors hold {obj.n_clusters} clusters and {len(obj.rows)} rows but "
                f"{CONFIG_FILE} says {cfg['n_clusters']} and {cfg['n_rows']}: the files come from different fits"
            )
        obj.validate()
        if expected is not None:
            want = tuple(int(s) for s in (expected.shape if isinstance(expected, torch.Tensor) else expected))
            if want != (obj.vocab_size, obj.hidden_size):
                raise ValueError(
                    f"the candidates in {directory} were fitted for an lm_head of (V, H) = "
                    f"{(obj.vocab_size, obj.hidden_size)}, not {want}: fit them again for this model"
                )
        return obj


def _read_files(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{directory / CONFIG_FILE} is not valid JSON ({e}): fit and save again") from e
    if cfg.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / CONFIG_FILE} has format {cfg.get('format')!r}; this code reads {FORMAT_VERSION}"
        )
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{directory / TENSORS_FILE} is truncated or corrupt ({e}): fit and save again") from e
    absent = {"centroids_CH", "offsets_C1", "rows"} - set(tensors)
    if absent:
        raise ValueError(f"{directory / TENSORS_FILE} lacks {sorted(absent)}: not a sparse output layer")
    return cfg, tensors


# ---------------------------------------------------------------------------------------------------- inference
def _check_inputs(candidates: OutputCandidates, hidden_TH, lm_head_VH) -> None:
    check_matrix("hidden_TH", hidden_TH, candidates.hidden_size)
    check_matrix("lm_head_VH", lm_head_VH, candidates.hidden_size)
    if lm_head_VH.shape[0] != candidates.vocab_size:
        raise ValueError(
            f"lm_head_VH has {lm_head_VH.shape[0]} rows but the candidates were fitted for V={candidates.vocab_size}"
        )


def _candidate_groups(
    candidates: OutputCandidates, hidden_TH, lm_head_VH, clusters_T, chunk: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(token indices, their cluster's rows_K, exact logits on those rows) for the tokens of each cluster, ``chunk``
    tokens at a time. Grouping by cluster gathers each cluster's rows once and makes one matmul of a group; clusters
    without candidates yield nothing (their tokens can only fall back)."""
    order_T = torch.argsort(clusters_T, stable=True)
    counts_C = torch.bincount(clusters_T, minlength=candidates.n_clusters)
    starts_C = (counts_C.cumsum(0) - counts_C).tolist()
    for c in counts_C.nonzero().flatten().tolist():
        rows_K = candidates.cluster_rows(c)
        if len(rows_K) == 0:
            continue
        w_KH = lm_head_VH[rows_K]
        for idx in order_T[starts_C[c] : starts_C[c] + int(counts_C[c])].split(chunk):
            yield idx, rows_K, hidden_TH[idx] @ w_KH.T


@torch.no_grad()
def sparse_logits(
    candidates: OutputCandidates,
    hidden_TH: torch.Tensor,
    lm_head_VH: torch.Tensor,
    confidence: float = 0.0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits_TV float32, info) of the sparse output layer.

    Each token gets exact logits on its cluster's candidate rows and the smallest of them on every other row; a
    token whose largest candidate probability (softmax over the candidates only, all it can see) is below
    ``confidence`` falls back to exact logits on all rows, as does a token whose cluster has no candidates.
    ``info``: ``fallback_T`` (bool), ``rows_read_T`` (lm_head rows read, V for a fallback; the centroids are
    counted apart, see ``OutputCandidates.bytes_read``), ``clusters_T``, ``candidate_confidence_T``. Temporaries
    are ``chunk`` x V at most, but the result itself is T x V (1.6 GB at T = 8192, V = 49,152): ``evaluate``
    scores without building it.
    """
    _check_inputs(candidates, hidden_TH, lm_head_VH)
    confidence = float(confidence)
    if math.isnan(confidence):
        raise ValueError("confidence is NaN; pass a probability threshold (0 never falls back, above 1 always does)")
    hidden_TH, lm_head_VH = hidden_TH.float(), lm_head_VH.float()
    (T, _), V = hidden_TH.shape, candidates.vocab_size
    clusters_T = candidates.assign(hidden_TH)
    out_TV, conf_T, rows_T = torch.empty(T, V), torch.zeros(T), torch.zeros(T, dtype=torch.long)
    for idx, rows_K, logits_NK in _candidate_groups(candidates, hidden_TH, lm_head_VH, clusters_T, chunk):
        block_NV = logits_NK.min(dim=1).values[:, None].expand(-1, V).clone()
        block_NV[:, rows_K] = logits_NK
        out_TV[idx] = block_NV
        conf_T[idx] = torch.exp(logits_NK.max(dim=1).values - torch.logsumexp(logits_NK, dim=1))
        rows_T[idx] = len(rows_K)
    fallback_T = (rows_T == 0) | (conf_T < confidence)
    for idx in fallback_T.nonzero().flatten().split(chunk):
        out_TV[idx] = hidden_TH[idx] @ lm_head_VH.T
    info = {
        "fallback_T": fallback_T,
        "rows_read_T": torch.where(fallback_T, V, rows_T),
        "clusters_T": clusters_T,
        "candidate_confidence_T": conf_T,
    }
    return out_TV, info


# --------------------------------------------------------------------------------------------------- evaluation
def full_logit_stats(hidden_TH, lm_head_VH, targets_T, chunk: int) -> dict[str, torch.Tensor]:
    """Per token, from the exact logits (built ``chunk`` tokens at a time, once): log-partition, top-1, target
    logit."""
    lse, top, target = [], [], []
    for h_TH, t_T in zip(hidden_TH.split(chunk), targets_T.split(chunk)):
        logits_TV = h_TH @ lm_head_VH.T
        lse.append(torch.logsumexp(logits_TV, dim=1))
        top.append(logits_TV.argmax(dim=1))
        target.append(logits_TV.gather(1, t_T[:, None])[:, 0])
    return {"lse": torch.cat(lse), "top": torch.cat(top), "target": torch.cat(target)}


def _candidate_stats(candidates: OutputCandidates, hidden_TH, lm_head_VH, targets_T, chunk: int):
    """Per token, what its sparse (not fallen-back) logits give, without building them: candidate confidence,
    rows, log-partition (the V - K floor rows added in closed form), top-1 (the best candidate: a floor row ties
    the weakest candidate at most), target logit (the floor when the target is no candidate) and whether it hit."""
    T, V = len(hidden_TH), candidates.vocab_size
    s = {k: torch.zeros(T) for k in ("confidence", "lse", "target")}
    s |= {"rows": torch.zeros(T, dtype=torch.long), "top": torch.zeros(T, dtype=torch.long)}
    s["hit"] = torch.zeros(T, dtype=torch.bool)
    clusters_T = candidates.assign(hidden_TH)
    for idx, rows_K, logits_NK in _candidate_groups(candidates, hidden_TH, lm_head_VH, clusters_T, chunk):
        K, t_N = len(rows_K), targets_T[idx]
        lse_N, (best_N, arg_N), floor_N = torch.logsumexp(logits_NK, 1), logits_NK.max(1), logits_NK.min(1).values
        pos_N = torch.searchsorted(rows_K, t_N).clamp(max=K - 1)
        hit_N = rows_K[pos_N] == t_N
        s["confidence"][idx] = torch.exp(best_N - lse_N)
        s["lse"][idx] = torch.logaddexp(lse_N, floor_N + math.log(V - K)) if K < V else lse_N
        s["target"][idx] = torch.where(hit_N, logits_NK.gather(1, pos_N[:, None])[:, 0], floor_N)
        s["top"][idx], s["hit"][idx], s["rows"][idx] = rows_K[arg_N], hit_N, K
    return s


def _confidence_row(candidates: OutputCandidates, full: dict, cand: dict, confidence: float, weight_bytes: float):
    V = candidates.vocab_size
    fallback_T = (cand["rows"] == 0) | (cand["confidence"] < confidence)
    nll_full_T = (full["lse"] - full["target"]).double()
    nll_sparse_T = torch.where(fallback_T, nll_full_T, (cand["lse"] - cand["target"]).double())
    top_T = torch.where(fallback_T, full["top"], cand["top"])
    rows_read_T = torch.where(fallback_T, V, cand["rows"])
    bytes_T = candidates.bytes_read(rows_read_T, weight_bytes) / candidates.full_bytes(weight_bytes)
    return {
        "method": "clusters",
        "confidence": float(confidence),
        "tokens": len(fallback_T),
        "clusters": candidates.n_clusters,
        "rows_per_cluster": int(candidates.meta.get("rows_per_cluster", candidates.cluster_sizes_C.max())),
        "mean_rows": candidates.mean_rows,
        "top1_agreement": (top_T == full["top"]).double().mean().item(),
        "target_in_candidates": (fallback_T | cand["hit"]).double().mean().item(),
        "ppl_full": math.exp(nll_full_T.mean().item()),
        "ppl_sparse": math.exp(nll_sparse_T.mean().item()),
        "ppl_ratio": math.exp((nll_sparse_T - nll_full_T).mean().item()),
        "fallback_rate": fallback_T.double().mean().item(),
        "rows_read_fraction": rows_read_T.double().mean().item() / V,
        "bytes_fraction": bytes_T.mean().item(),
    }


@torch.no_grad()
def evaluate(
    candidates: OutputCandidates,
    hidden_TH: torch.Tensor,
    lm_head_VH: torch.Tensor,
    targets_T: torch.Tensor,
    valid_T: torch.Tensor | None = None,
    confidences: Sequence[float] = (0.0, 0.2, 0.4, 0.6),
    weight_bytes: float = 4.0,
    chunk: int = 1024,
) -> pd.DataFrame:
    """One row per confidence threshold: quality against the full lm_head and bytes read, over the valid positions.

    Columns: ``confidence``, ``tokens``, ``clusters``, ``rows_per_cluster`` (the cap fitted with), ``mean_rows``,
    ``top1_agreement``, ``target_in_candidates`` (the target's logit was computed exactly: a candidate, or a
    fallback), ``ppl_full``, ``ppl_sparse``, ``ppl_ratio`` (exp of the mean paired NLL difference),
    ``fallback_rate``, ``rows_read_fraction`` (of V, fallbacks included) and ``bytes_fraction`` (centroids in
    float32 plus rows read at ``weight_bytes`` a weight, over the full lm_head's bytes; mean over tokens). The full
    logits are computed once, ``chunk`` tokens at a time, and the sparse ones are scored in closed form, so nothing
    T x V is built; the numbers are those of ``sparse_logits``.
    """
    _check_inputs(candidates, hidden_TH, lm_head_VH)
    T, V = len(hidden_TH), candidates.vocab_size
    valid_T = torch.ones(T, dtype=torch.bool) if valid_T is None else torch.as_tensor(valid_T, dtype=torch.bool)
    targets_T = torch.as_tensor(targets_T, dtype=torch.long)
    if targets_T.shape != (T,) or valid_T.shape != (T,):
        raise ValueError(
            f"targets_T and valid_T must have shape ({T},); got {tuple(targets_T.shape)}, {tuple(valid_T.shape)}"
        )
    hidden_TH, lm_head_VH, targets_T = hidden_TH[valid_T].float(), lm_head_VH.float(), targets_T[valid_T]
    if len(targets_T) == 0:
        raise ValueError("no valid position to score: valid_T is all False")
    if targets_T.min() < 0 or targets_T.max() >= V:
        raise ValueError(f"valid targets must lie in [0, {V}); mark positions without a next token invalid")
    full = full_logit_stats(hidden_TH, lm_head_VH, targets_T, chunk)
    cand = _candidate_stats(candidates, hidden_TH, lm_head_VH, targets_T, chunk)
    return pd.DataFrame([_confidence_row(candidates, full, cand, c, weight_bytes) for c in confidences])


def cheapest_within(
    table: pd.DataFrame, ppl_budget: float | None = None, min_top1: float | None = None
) -> pd.Series | None:
    """The row of ``evaluate`` / ``svd_preview.evaluate_svd`` tables (concatenated) that reads the fewest bytes
    while its perplexity stays within ``ppl_budget`` (0.02: 2%) of the full lm_head's, or while its top-1
    agreement with the full layer is at least ``min_top1`` (what greedy decoding keeps): give one of the two.
    None when no row qualifies. One rule, so the notebook and any report name the same point."""
    if (ppl_budget is None) == (min_top1 is None):
        raise ValueError("give exactly one of ppl_budget and min_top1")
    if ppl_budget is not None and ppl_budget < 0:
        raise ValueError(f"ppl_budget must be >= 0; got {ppl_budget}")
    ok = table[table.ppl_ratio <= 1 + ppl_budget] if min_top1 is None else table[table.top1_agreement >= min_top1]
    return None if ok.empty else ok.loc[ok.bytes_fraction.idxmin()]


def bytes_fraction_in_format(row, vocab_size: int, hidden_size: int, bytes_per_weight: float) -> float:
    """A table row's (or a dict's with its fields) bytes over the full lm_head's, the rows in a weight format of
    ``bytes_per_weight`` (the tables count float32): the selector (centroids, or the SVD basis) stays float32
    whatever the format."""
    full = vocab_size * hidden_size * bytes_per_weight
    if row["method"] == "clusters":
        return float(row["rows_read_fraction"]) + row["clusters"] * hidden_size * CENTROID_BYTES / full
    rank, top_n = int(row["rank"]), int(row["top_n"])
    return (
        (vocab_size * rank + top_n * (hidden_size - rank)) * bytes_per_weight + hidden_size**2 * CENTROID_BYTES
    ) / full
