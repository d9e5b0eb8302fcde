"""Omega = W_Q W_K^T per attention head, its SVD truncated to d_head, and an HDF5 cache of it.

Scores of head h (layer l) on the *normalised* layer input x^ = n(x) (``Arch.normalize``; the norm's
gain/bias are folded into W_Q, b_Q, W_K, b_K by ``Arch.qk``):

    score(d, s) = scale * (x^_d W_Q + b_Q) M(d - s) (x^_s W_K + b_K)^T

where M(delta) is the rotary matrix (the identity for models without rotary). Following Franco &
Crovella 2025 ("Pinpointing attention-causal communication in language models", NeurIPS; Appendix A)
the biases are kept through augmented coordinates x~ = [x^, 1]. Two forms per head, one per side:

- query side ("q"): Omega_q(delta) = W_Q M(delta) W~_K^T, d x (d+1), with W~_K = [W_K; b_K]; its left
  singular vectors U (d x d_head) span the query input space and pair with x^_d.
- key side ("k"):   Omega_k(delta) = W~_Q M(delta) W_K^T, (d+1) x d, with W~_Q = [W_Q; b_Q]; its right
  singular vectors V (d x d_head) span the key input space and pair with x^_s.

Both have rank <= d_head, so the SVD is computed in factored form instead of on a d x d matrix: with
QR factorisations A = Q_A R_A, B = Q_B R_B (diag(R) >= 0, so the factors are unique),
A M B^T = Q_A (R_A M R_B^T) Q_B^T and the SVD of the small d_head x d_head core, u s vh, gives
U = Q_A u, S = s, V = Q_B vh^T exactly. For GPT-2 small this takes milliseconds for all 144 heads where
a dense 768 x 769 SVD per head takes seconds, and it is better conditioned (the reference needed numpy
for rotary models). Grouped-query attention: query head h uses key head ``Arch.kv_head(h)``.

Rotary models need one SVD per relative distance delta = dest - src; cores are computed lazily per
delta (all layers and heads in one batched SVD) and cached in memory and on disk.

The disk cache (``<cache_dir>/<model-id>@<revision>.h5``) stores the cores (u, s, vh per side and
delta) in float32; the Q/R factors are recomputed from the weights on load (unique, so they match).
A fingerprint of the folded weights guards against a cache from other weights under the same name.

Centring (``center=True``, the default; Franco & Crovella's weights convention): their pipeline runs on
TransformerLens weights processed with ``fold_ln``, which for LayerNorm models also centres W_Q and W_K
over d_model (W <- W - mean_d W, i.e. the all-ones direction projected out of their row space). The
LayerNorm-normalised input x^ is itself centred (x^ . 1 = 0), so every score is unchanged, but Omega's
SVD is not (singular values move by 5-10% on GPT-2) and with it which components a signal selects.
RMSNorm families (Llama, Gemma-2, Mistral) are never centred: their normalised input is not mean-free,
so centring would change the scores (TransformerLens does not centre them either). ``center=False``
keeps the uncentred weights (the behaviour before centring was added).

For NDIF-hosted models (weights not on this machine) ``remote_factors`` computes the QR factors and the
delta-0 cores inside one remote session and returns only them (rank d_head per head: the selected
components, never a d x d Omega); ``Omega(..., factors=...)`` then works like a local one.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from interpkit.analyses.attention_tracing.linalg import augmented_r, center_rows, qr_pos

SIDES = ("q", "k")


@dataclass
class LayerFactors:
    """QR factors of one layer's folded Q/K weights, expanded to query heads, float64.

    W_Q [H, d, dh], b_Q [H, dh], W_K [H, d, dh], b_K [H, dh] (key weights of each query head's KV head);
    QA/RA: QR of W_Q; QK/RK: QR of W_K; RKa / RQa: R of the augmented [W_K; b_K] / [W_Q; b_Q], from
    R~^T R~ = R^T R + b b^T (no second QR of a d x d_head matrix); their Q only for ``Omega.svd``.
    """

    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    QA: torch.Tensor
    RA: torch.Tensor
    RKa: torch.Tensor
    QK: torch.Tensor
    RK: torch.Tensor
    RQa: torch.Tensor
    scale: float
    softcap: float | None

    def augmented_q(self, side: str) -> torch.Tensor:
        """Q of [W_K; b_K] (side "q") or [W_Q; b_Q] (side "k"): [H, d + 1, dh]."""
        W, b, R = (self.W_K, self.b_K, self.RKa) if side == "q" else (self.W_Q, self.b_Q, self.RQa)
        return torch.linalg.solve_triangular(R, torch.cat([W, b[:, None]], dim=1), upper=True, left=False)


def layer_factors(W_Q, b_Q, W_K, b_K, scale: float, softcap) -> LayerFactors:
    """LayerFactors from folded (and possibly centred) float64 Q/K weights of one layer."""
    QA, RA = qr_pos(W_Q)
    QK, RK = qr_pos(W_K)
    return LayerFactors(W_Q, b_Q, W_K, b_K, QA, RA, augmented_r(RK, b_K), QK, RK, augmented_r(RA, b_Q),
                        scale=scale, softcap=softcap)


class Omega:
    """Per-head Omega SVDs of one model (see module docstring), computed lazily and cached.

    ``core(side, delta)`` -> (u [L,H,dh,dh], s [L,H,dh], vh [L,H,dh,dh]); ``svd(layer, head, side, delta)``
    -> full-space (U, S, V); ``matrix(...)`` -> the dense Omega (tests). ``rotation(delta)`` -> M(delta).
    ``factors`` ({layer: LayerFactors}) and ``cores`` ({(side, delta): (u, s, vh)}): computed elsewhere
    (``remote_omega``); a matching disk cache still takes precedence for the cores.
    """

    def __init__(self, arch, model_id: str | None = None, revision: str | None = None,
                 cache_dir: str | Path | None = None, center: bool = True, factors: dict | None = None,
                 cores: dict | None = None):
        self.arch = arch
        self.center = bool(center)
        self.centred = self.center and arch.family.centred_norm   # RMSNorm inputs are not mean-free
        self.model_id = model_id or getattr(arch.hf, "name_or_path", "") or "model"
        self.revision = revision
        self._factors: dict[int, LayerFactors] = dict(factors or {})
        self.remote = factors is not None               # factors computed where the weights are (NDIF)
        self._cores: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = dict(cores or {})
        self._rot: dict[int, torch.Tensor] = {}
        self._dirty: set[tuple[str, int]] = set()
        suffix = ("" if self.centred or not arch.family.centred_norm else ".uncentred") + \
            (".remote" if self.remote else "")
        self.path = None if cache_dir is None else \
            Path(cache_dir) / f"{_slug(self.model_id)}@{revision or 'main'}{suffix}.h5"
        self.fingerprint = self._fingerprint()
        if self.path is not None:
            self._load()

    # -- weights ----------------------------------------------------------------------------------
    def factors(self, layer: int) -> LayerFactors:
        if layer not in self._factors:
            self._factors[layer] = self._make_factors(layer)
        return self._factors[layer]

    def _make_factors(self, layer: int) -> LayerFactors:
        a = self.arch
        with torch.no_grad():
            qk = a.qk(layer)
        kv = torch.tensor([a.kv_head(h) for h in range(a.n_heads)])
        W_Q, b_Q = qk.W_Q.detach().double(), qk.b_Q.detach().double()
        W_K, b_K = qk.W_K.detach().double()[kv], qk.b_K.detach().double()[kv]
        if self.centred:
            W_Q, W_K = center_rows(W_Q), center_rows(W_K)
        return layer_factors(W_Q, b_Q, W_K, b_K, float(qk.scale), qk.softcap)

    def delta_key(self, delta: int) -> int:
        """Cache key of a relative distance: all distances share one SVD without rotary."""
        return int(delta) if self.arch.rotary else 0

    def rotation(self, delta: int) -> torch.Tensor:
        """M(delta) [dh, dh], float64: rot(q, d) . rot(k, s) = q^T M(d - s) k (identity without rotary)."""
        delta = self.delta_key(delta)
        if delta not in self._rot:
            dh = self.arch.d_head
            eye = torch.eye(dh)
            if not self.arch.rotary:
                self._rot[delta] = eye.double()
            else:   # rows of rotate(E, delta) are A_delta e_i, i.e. A_delta^T = A_d^T A_s for d - s = delta
                with torch.no_grad():
                    rot = self.arch.rotate(eye[:, None, :], torch.tensor([delta]))
                self._rot[delta] = rot[:, 0, :].double()
        return self._rot[delta]

    def rotations(self, deltas: torch.Tensor) -> torch.Tensor | None:
        """M for each delta: [n, dh, dh]; None without rotary (M = I)."""
        if not self.arch.rotary:
            return None
        return torch.stack([self.rotation(int(x)) for x in deltas])

    # -- cores ------------------------------------------------------------------------------------
    def core(self, side: str, delta: int = 0):
        """(u [L,H,dh,dh], s [L,H,dh], vh [L,H,dh,dh]) of the small core of Omega_side(delta), float64."""
        key = (side, self.delta_key(delta))
        if key not in self._cores:
            self._cores[key] = self._make_core(side, key[1])
            self._dirty.add(key)
        return self._cores[key]

    def cores(self, side: str, deltas: torch.Tensor, layer: int):
        """Stacked cores of one layer for several deltas: u [n,H,dh,dh], s [n,H,dh], vh [n,H,dh,dh]."""
        if not self.arch.rotary:
            return tuple(t[layer][None].expand(len(deltas), *t.shape[1:]) for t in self.core(side, 0))
        parts = [self.core(side, int(x)) for x in deltas]
        return tuple(torch.stack([p[i][layer] for p in parts]) for i in range(3))

    def _make_core(self, side: str, delta: int):
        M = self.rotation(delta)
        fs = [self.factors(l) for l in range(self.arch.n_layers)]
        if side == "q":
            small = torch.stack([f.RA @ M @ f.RKa.transpose(-1, -2) for f in fs])
        elif side == "k":
            small = torch.stack([f.RQa @ M @ f.RK.transpose(-1, -2) for f in fs])
        else:
            raise ValueError(f"side must be 'q' or 'k', not {side!r}")
        u, s, vh = torch.linalg.svd(small)
        return u, s, vh

    def svd(self, layer: int, head: int, side: str, delta: int = 0):
        """Full-space truncated SVD of Omega_side(delta): U [rows, dh], S [dh], V [cols, dh].

        q side: rows = d (query input), cols = d + 1 (augmented key input). k side: rows = d + 1, cols = d.
        """
        f = self.factors(layer)
        u, s, vh = (t[layer, head] for t in self.core(side, delta))
        if side == "q":
            return f.QA[head] @ u, s, f.augmented_q("q")[head] @ vh.T
        return f.augmented_q("k")[head] @ u, s, f.QK[head] @ vh.T

    def matrix(self, layer: int, head: int, side: str, delta: int = 0) -> torch.Tensor:
        """The dense Omega_side(delta) from the weights (no SVD), for checks."""
        f, M = self.factors(layer), self.rotation(delta)
        if side == "q":
            return f.W_Q[head] @ M @ torch.cat([f.W_K[head], f.b_K[head][None]]).T
        return torch.cat([f.W_Q[head], f.b_Q[head][None]]) @ M @ f.W_K[head].T

    # -- disk cache -------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for layer in sorted({0, self.arch.n_layers - 1}):
            if self.remote:
                qk = self._factors[layer]
            else:
                with torch.no_grad():
                    qk = self.arch.qk(layer)
            for t in (qk.W_Q, qk.b_Q, qk.W_K, qk.b_K):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.arch.n_layers, self.arch.n_heads, self.arch.d_model, self.arch.rotary)).encode())
        if self.centred:
            h.update(b"centred")
        return h.hexdigest()[:16]

    def _load(self) -> None:
        import h5py

        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("fingerprint") != self.fingerprint:
                    warnings.warn(f"{self.path} holds Omega SVDs of other weights; recomputing")
                    return
                for side in SIDES:
                    for name, g in f.get(side, {}).items():
                        self._cores[(side, int(name))] = tuple(torch.from_numpy(g[k][()]).double()
                                                               for k in ("u", "s", "vh"))
        except OSError as e:
            warnings.warn(f"cannot read the Omega cache {self.path} ({e}); recomputing")

    def save(self) -> Path | None:
        """Write cores computed since the last save to the HDF5 cache (no-op without a cache_dir)."""
        import h5py

        if self.path is None or not self._dirty:
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with h5py.File(self.path, "a") as f:
                if f.attrs.get("fingerprint") != self.fingerprint:
                    for k in list(f.keys()):
                        del f[k]
                f.attrs.update({"fingerprint": self.fingerprint, "model_id": self.model_id,
                                "revision": self.revision or "main", "rank": self.arch.d_head})
                for side, delta in sorted(self._dirty):
                    g = f.require_group(side).require_group(str(delta))
                    for name, t in zip(("u", "s", "vh"), self._cores[(side, delta)]):
                        if name in g:
                            del g[name]
                        g.create_dataset(name, data=t.float().numpy())
            self._dirty.clear()
        except OSError as e:
            warnings.warn(f"cannot write the Omega cache {self.path} ({e}); continuing without it")
        return self.path


def default_cache_dir() -> Path:
    """``$INTERPKIT_CACHE/omega`` (default ``~/.cache/interpkit/omega``)."""
    return Path(os.environ.get("INTERPKIT_CACHE", "~/.cache/interpkit")).expanduser() / "omega"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "model"
