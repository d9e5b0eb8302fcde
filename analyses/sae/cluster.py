"""Multi-dimensional features from SAE decoder directions (Engels et al. 2024, section 4).

- ``spectral_clusters``: spectral clustering of the decoder directions with the paper's affinity
  1 - arccos(cos)/pi (normalised-Laplacian embedding, then seeded k-means++), in torch.
- ``graph_clusters``: link each latent to its ``top_k`` most cosine-similar latents when the cosine is
  above ``cutoff``, symmetrise, take connected components of size >= 2.
- ``reconstruct``: for every token where a cluster latent fires, the activation projected on the
  cluster's decoder span (sum of f_i W_dec_i over the cluster's latents), its top PCA components, the
  irreducibility indices (``analyses.circles.irreducibility``) of consecutive PC pairs, and, when the tokens are
  days or months, the circle probe R^2 (``analyses.circles.features``) of the value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from interpkit.errors import UserError


def cosine_matrix(W_dec: torch.Tensor) -> torch.Tensor:
    W = W_dec.double()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (W @ W.T).clamp(-1, 1)


def kmeans(X: torch.Tensor, k: int, seed: int = 0, iters: int = 100, restarts: int = 4) -> torch.Tensor:
    """Labels [n] of seeded k-means++ (best of ``restarts`` by inertia)."""
    g = torch.Generator().manual_seed(seed)
    n = len(X)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centers = [X[torch.randint(n, (1,), generator=g)].squeeze(0)]
        for _ in range(1, k):
            d2 = torch.cdist(X, torch.stack(centers)).pow(2).min(1).values
            if float(d2.sum()) <= 0:
                centers.append(X[torch.randint(n, (1,), generator=g)].squeeze(0))
                continue
            centers.append(X[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
        C = torch.stack(centers)
        for _ in range(iters):
            lab = torch.cdist(X, C).argmin(1)
            newC = torch.stack([X[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(k)])
            if torch.allclose(newC, C):
                break
            C = newC
        inertia = float((X - C[lab]).pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = lab, inertia
    return best


def spectral_clusters(W_dec: torch.Tensor, n_clusters: int, seed: int = 0) -> torch.Tensor:
    """Cluster label per latent [d_sae] from the affinity 1 - arccos(cos)/pi."""
    n = W_dec.shape[0]
    if not 2 <= n_clusters <= n:
        raise UserError(f"n_clusters must be in 2..{n} (the number of latents), got {n_clusters}")
    A = 1 - torch.arccos(cosine_matrix(W_dec)) / math.pi
    A.fill_diagonal_(0)
    d = A.sum(1).clamp_min(1e-12).rsqrt()
    M = d[:, None] * A * d[None, :]
    vals, vecs = torch.linalg.eigh(M)
    U = vecs[:, -n_clusters:]
    U = U / U.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return kmeans(U.float(), n_clusters, seed)


def graph_clusters(W_dec: torch.Tensor, cutoff: float = 0.5, top_k: int | None = 2) -> list[list[int]]:
    """Connected components (size >= 2) of the graph of cosine > cutoff (within each latent's top_k)."""
    C = cosine_matrix(W_dec)
    C.fill_diagonal_(-2)
    adj = C > cutoff
    if top_k is not None:
        keep = torch.zeros_like(adj)
        idx = C.topk(min(top_k, C.shape[0] - 1), dim=1).indices
        keep.scatter_(1, idx, True)
        adj &= keep
    adj = adj | adj.T
    parent = list(range(len(C)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in adj.nonzero().tolist():
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(C)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=len, reverse=True)


def labels_to_clusters(labels: torch.Tensor, min_size: int = 2) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        out.setdefault(c, []).append(i)
    return sorted((v for v in out.values() if len(v) >= min_size), key=len, reverse=True)


def mean_pairwise_cosine(W_dec: torch.Tensor, cluster: list[int]) -> float:
    if len(cluster) < 2:
        return float("nan")
    C = cosine_matrix(W_dec[cluster])
    n = len(cluster)
    return float((C.sum() - n) / (n * (n - 1)))


@dataclass
class ClusterReconstruction:
    cluster: list[int]
    rows: torch.Tensor                 # [m] indices of the tokens where a cluster latent fires
    recon: torch.Tensor                # [m, d] sum of f_i W_dec_i over the cluster
    pcs: torch.Tensor                  # [m, k] top PCA coordinates
    explained: torch.Tensor            # [k]
    mixture: list[float] = field(default_factory=list)        # per consecutive PC pair
    separability: list[float] = field(default_factory=list)
    circle: dict = field(default_factory=dict)                # {"days"|"months": {"r2", "r2_heldout", "n"}}


@torch.no_grad()
def reconstruct(sae, X: torch.Tensor, cluster: list[int], k: int = 5, max_points: int = 5000,
                indices: bool = True, seed: int = 0) -> ClusterReconstruction | None:
    """Cluster reconstruction of X [n, d] (None when fewer than 3 tokens fire the cluster)."""
    from interpkit.analyses.circles.features import pca
    from interpkit.analyses.circles.irreducibility import epsilon_mixture_index, separability_index

    f = sae.encode(X)[:, cluster]
    rows = (f > 0).any(1).nonzero().squeeze(1)
    if len(rows) > max_points:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=g)[:max_points]].sort().values
    if len(rows) < 3:
        return None
    recon = f[rows] @ sae.W_dec[cluster]
    _, V, ratio = pca(recon, k)
    Z = (recon.double() - recon.double().mean(0)) @ V
    out = ClusterReconstruction(cluster, rows, recon, Z.float(), ratio.float())
    if indices:
        for a in range(min(k, len(cluster)) - 1):
            pair = Z[:, a:a + 2]
            if float(pair.std(0).min()) < 1e-9:
                continue
            out.mixture.append(epsilon_mixture_index(pair))
            out.separability.append(separability_index(pair))
    return out


def value_labels(token_strings: list[str]) -> dict[str, torch.Tensor]:
    """Day index (0-6) and month index (0-11) of each token, -1 elsewhere (matched on the stripped text)."""
    from interpkit.tasks.calendar import DAYS, MONTHS

    out = {}
    for kind, words in (("days", DAYS), ("months", MONTHS)):
        lut = {w.lower(): i for i, w in enumerate(words)}
        lut.update({w[:3].lower(): i for i, w in enumerate(words)})
        out[kind] = torch.tensor([lut.get(t.strip(" Ġ▁").lower(), -1) for t in token_strings])
    return out


def circle_fit(recon: torch.Tensor, values: torch.Tensor, period: int, k: int = 5) -> dict | None:
    """Circle-probe R^2 (in-sample and value-held-out) of reconstructions at tokens with a value."""
    from interpkit.analyses.circles.features import fit_circle

    keep = values >= 0
    if int(keep.sum()) < 10 or len(torch.unique(values[keep])) < max(3, period // 2):
        return None
    X = recon[keep].double()
    sv = torch.linalg.svdvals(X - X.mean(0))
    rank = int((sv > 1e-6 * sv[0].clamp_min(1e-30)).sum()) if len(sv) else 0
    if rank < 2:
        return None
    fit = fit_circle(X[:, None], values[keep], period, k=min(k, rank))
    return {"r2": float(fit.r2[0]), "r2_heldout": float(fit.r2_heldout[0]), "n": int(keep.sum()),
            "n_values": int(len(torch.unique(values[keep])))}
