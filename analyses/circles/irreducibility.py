"""Is a multi-dimensional feature really irreducible? Two indices of Engels et al. for point clouds.

A feature f (a cloud of points, one per occurrence) is *reducible* if it is

- a **mixture**: most points lie (up to epsilon) on a lower-dimensional affine subspace, with the rest
  "off" -- measured by the **epsilon-mixture index**
  ``M_eps(f) = max_{v, c} mean( |v.f + c| < eps * RMS(v.f + c) )``: high (near the mixture weight)
  for a mixture of two lines, low for a circle;
- or **separable**: some rotation makes the coordinates statistically independent -- measured by the
  **separability index** ``S(f) = min over rotations of MI(x', y')``: near 0 for an (anisotropic)
  Gaussian or a uniform square, high for a circle, whose coordinates stay dependent in every rotation.

A circle scores low M_eps and high S: irreducible. Both functions take [n, 2] clouds (the mixture index
also [n, d]); they are deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from interpkit.plots import finish, pyplot


def _center(points: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(points, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 3:
        raise ValueError(f"expected a point cloud [n >= 3, d], got shape {tuple(x.shape)}")
    return x - x.mean(0)


def _mixture_fraction(z: torch.Tensor, c: torch.Tensor, eps: float) -> float:
    """Fraction of points with |z + c| < eps * RMS(z + c), for a projection z [n] and an offset c."""
    s = z + c
    return float((s.abs() < eps * s.pow(2).mean().sqrt().clamp_min(1e-12)).double().mean())


def epsilon_mixture_index(points, eps: float = 0.1, n_angles: int = 360, n_offsets: int = 401,
                          steps: int = 2000, seed: int = 0) -> float:
    """M_eps of a point cloud [n, d].

    In 2-D the maximum is found by exhaustive search over directions (``n_angles`` in [0, pi)) and offsets
    (``n_offsets`` quantiles of the projection, plus 0), exact up to the grid: with the cloud centred,
    RMS(z + c)^2 = var(z) + c^2, and the points inside the band are counted on the sorted projection. In
    higher dimension: gradient ascent on the sigmoid relaxation mean(sigmoid((eps - |v.f + c| / RMS) / tau))
    with tau annealed from 1 to 0.01 (Adam, lr 0.1) from several seeded starts, then the hard fraction.
    """
    x = _center(points)
    n, d = x.shape
    if d != 2:
        return _mixture_index_gd(x, eps, steps, seed)
    theta = torch.arange(n_angles, dtype=torch.float64) * math.pi / n_angles
    z = torch.stack([theta.cos(), theta.sin()], 1) @ x.T                    # [A, n], each row centred
    zs = z.sort(1).values
    q = torch.linspace(0, 1, n_offsets, dtype=torch.float64)
    c = torch.cat([-torch.quantile(z, q, dim=1).T, torch.zeros(n_angles, 1, dtype=torch.float64)], 1)   # [A, m]
    band = eps * (z.pow(2).mean(1, keepdim=True) + c.pow(2)).sqrt()         # eps * RMS(z + c)
    inside = torch.searchsorted(zs, -c + band, side="left") - torch.searchsorted(zs, -c - band, side="right")
    return float(inside.max()) / n


def _mixture_index_gd(x: torch.Tensor, eps: float, steps: int, seed: int, restarts: int = 4) -> float:
    g = torch.Generator().manual_seed(seed)
    x = x.float() / x.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
    best = 0.0
    with torch.enable_grad():
        for _ in range(restarts):
            v = torch.randn(x.shape[1], generator=g).requires_grad_(True)
            c = torch.zeros(1, requires_grad=True)
            opt = torch.optim.Adam([v, c], lr=0.1)
            for step in range(steps):
                tau = 1.0 * (0.01 / 1.0) ** (step / max(1, steps - 1))
                s = x @ v + c
                r = s.abs() / s.pow(2).mean().sqrt().clamp_min(1e-12)
                loss = -torch.sigmoid((eps - r) / tau).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                best = max(best, _mixture_fraction((x @ v).double(), c.double(), eps))
    return best


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 10) -> float:
    """Plug-in mutual information (bits) of two samples from a bins x bins histogram over their ranges."""
    def digitize(t):
        lo, hi = t.min(), t.max()
        return ((t - lo) / (hi - lo).clamp_min(1e-12) * bins).long().clamp(0, bins - 1)

    i, j = digitize(a), digitize(b)
    joint = torch.zeros(bins * bins, dtype=torch.float64).index_add_(0, i * bins + j, torch.ones(len(a), dtype=torch.float64))
    joint = (joint / len(a)).reshape(bins, bins)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    ratio = joint / (pa * pb).clamp_min(1e-300)
    return float((joint * torch.log2(ratio.clamp_min(1e-300))).where(joint > 0, torch.zeros(())).sum())


def separability_index(points, bins: int = 10, n_angles: int = 90) -> float:
    """S of a 2-D cloud: min over rotations in [0, pi/2) of the mutual information (bits) of the rotated
    coordinates. (A quarter turn only permutes and negates the axes, which leaves MI unchanged.)"""
    x = _center(points)
    if x.shape[1] != 2:
        raise ValueError("the separability index is defined here for 2-D clouds; pass a pair of coordinates")
    best = float("inf")
    for k in range(n_angles):
        t = k * (math.pi / 2) / n_angles
        rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
        y = x @ rot
        best = min(best, mutual_information(y[:, 0], y[:, 1], bins))
    return best


@dataclass
class Irreducibility:
    """Both indices of one 2-D cloud."""

    mixture: float          # M_eps: high -> a mixture (reducible)
    separability: float     # S (bits): low -> separable (reducible)
    eps: float = 0.1

    def irreducible(self, max_mixture: float = 0.3, min_separability: float = 0.2) -> bool:
        """Neither a mixture nor separable under the given thresholds."""
        return self.mixture < max_mixture and self.separability > min_separability


def irreducibility(points, eps: float = 0.1, bins: int = 10) -> Irreducibility:
    return Irreducibility(mixture=epsilon_mixture_index(points, eps), separability=separability_index(points, bins),
                          eps=eps)


# ----------------------------------------------------------------------------------------------------
# synthetic clouds (tests, docs, sanity checks)
# ----------------------------------------------------------------------------------------------------
def synthetic_cloud(kind: str, n: int = 2000, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """[n, 2] clouds: "circle" (irreducible), "two_lines" (a 50/50 mixture of two 1-D features, each
    active alone), "gaussian" (independent anisotropic Gaussian, rotated: separable), "square"."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "circle":
        t = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
        x = torch.stack([t.cos(), t.sin()], 1)
    elif kind == "two_lines":
        a = r(n)
        on_x = torch.rand(n, generator=g) < 0.5
        x = torch.stack([torch.where(on_x, a, torch.zeros(())), torch.where(on_x, torch.zeros(()), a)], 1)
    elif kind == "gaussian":
        x = r(n, 2) * torch.tensor([2.0, 0.5], dtype=torch.float64)
        t = 0.6
        x = x @ torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)
    elif kind == "square":
        x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    else:
        raise ValueError(f"unknown cloud {kind!r}; use circle, two_lines, gaussian or square")
    return x + noise * r(n, 2)


# ----------------------------------------------------------------------------------------------------
# the reducibility demo (Engels et al.'s reducibility_demo.py, Figures 2 and 9) and a layer's activations
# ----------------------------------------------------------------------------------------------------
CLOUDS = ("circle", "two_lines", "gaussian", "square")


def synthetic_table(n: int = 1000, eps: float = 0.1, seed: int = 0) -> list[dict]:
    """Both indices of each synthetic cloud (with the clouds, for plotting)."""
    rows = []
    for kind in CLOUDS:
        x = synthetic_cloud(kind, n=n, seed=seed)
        ind = irreducibility(x, eps)
        rows.append(dict(cloud=kind, mixture=ind.mixture, separability=ind.separability,
                         irreducible=ind.irreducible(), points=x))
    return rows


def pc_pairs(acts: torch.Tensor, n_pcs: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n_pcs`` PCA coordinates [N, n_pcs] of activations [N, d] and their explained-variance ratios."""
    X = torch.as_tensor(acts, dtype=torch.float64)
    X = X - X.mean(0)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    k = min(n_pcs, Vh.shape[0])
    return X @ Vh[:k].T, (S[:k] ** 2) / (S ** 2).sum().clamp_min(1e-30)


def layer_table(acts, eps: float = 0.1, n_pcs: int = 5) -> tuple[list[dict], torch.Tensor]:
    """Indices of each consecutive pair of top PCA components (1-2, 2-3, ...), as the paper does for SAE
    cluster reconstructions; returns (rows, PCA coordinates)."""
    Z, ratio = pc_pairs(acts, n_pcs)
    rows = []
    scale = float(torch.as_tensor(acts, dtype=torch.float64).abs().max()) or 1.0
    for i in range(Z.shape[1] - 1):
        if float(Z[:, i:i + 2].std(0).min()) <= 1e-6 * scale:     # a constant direction: no cloud to judge
            rows.append(dict(pair=f"PC{i + 1}-PC{i + 2}", mixture=float("nan"), separability=float("nan"),
                             irreducible=False, variance=float(ratio[i] + ratio[i + 1])))
            continue
        ind = irreducibility(Z[:, i:i + 2], eps)
        rows.append(dict(pair=f"PC{i + 1}-PC{i + 2}", mixture=ind.mixture, separability=ind.separability,
                         irreducible=ind.irreducible(), variance=float(ratio[i] + ratio[i + 1])))
    return rows, Z


def plot_synthetic(rows: list[dict], path=None):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows), 3.5), squeeze=False)
    for ax, r in zip(axes[0], rows):
        x = r["points"]
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{r['cloud']}\nM_eps={r['mixture']:.3f}  S={r['separability']:.3f} bits\n"
                     f"{'irreducible' if r['irreducible'] else 'reducible'}", fontsize=8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("epsilon-mixture index (high: a mixture) and separability index (low: separable)", fontsize=9)
    return finish(fig, path)


def plot_layer(rows: list[dict], Z: torch.Tensor, values, period: int, path=None, title: str = ""):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows), 3.5), squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[0], rows)):
        sc = ax.scatter(Z[:, i], Z[:, i + 1], c=torch.as_tensor(values) % period, cmap="hsv", vmin=0,
                        vmax=period, s=16)
        ax.set_title(f"{r['pair']} ({100 * r['variance']:.0f}% var)\nM_eps={r['mixture']:.3f}  "
                     f"S={r['separability']:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes[0, -1], label="value")
    fig.suptitle(title, fontsize=9)
    return finish(fig, path)


def reducibility_command(model: str | None = None, task: str = "days", layer: int | None = None,
                         role: str = "start", n: int = 1000, eps: float = 0.1, seed: int = 0,
                         root: str = "artifacts", echo=print) -> dict:
    """``interpkit reducibility``: the indices on synthetic clouds, and with ``--model`` on the top PCA
    pairs of a layer's residual at a task role (values coloured). Writes synthetic.png, layer<l>.png and
    indices.json under artifacts/reducibility/<run>."""
    import json

    from interpkit.errors import UserError
    from interpkit.store import RunStore

    if not 0 < eps < 1 or n < 10:
        raise UserError("--eps must be in (0, 1) and --n >= 10")
    store = RunStore("reducibility", {"model": model, "task": task, "layer": layer, "role": role, "n": n,
                                      "eps": eps}, model=model or "synthetic", seed=seed, root=root)
    rows = synthetic_table(n, eps, seed)
    plot_synthetic(rows, store.dir / "synthetic.png")
    out = {"synthetic": [{k: v for k, v in r.items() if k != "points"} for r in rows], "files": ["synthetic.png"]}
    echo(f"{'cloud':<10} {'M_eps':>7} {'S (bits)':>9}  verdict")
    for r in out["synthetic"]:
        echo(f"{r['cloud']:<10} {r['mixture']:>7.3f} {r['separability']:>9.3f}  "
             f"{'irreducible' if r['irreducible'] else 'reducible'}")
    if model is not None:
        from interpkit.analyses.probing.linear import collect_residuals
        from interpkit.models import load_model
        from interpkit.tasks import get_task

        lm = load_model(model)
        prompts = get_task(task)(lm.tokenizer)
        positions = prompts.role(role)
        layers = list(range(lm.arch.n_layers + 1)) if layer is None else [layer]
        if any(not 0 <= l <= lm.arch.n_layers for l in layers):
            raise UserError(f"layer {layer} is out of range; 0..{lm.arch.n_layers} (0 = embeddings)")
        acts = collect_residuals(lm, prompts, positions)
        key = {"start": "a", "duration": "b", "end": "c"}.get(role)
        values = torch.tensor(prompts.meta[key]) if key else torch.zeros(len(prompts))
        period = {"days": 7, "months": 12}.get(task, int(values.max()) + 1)
        out["layers"] = {}
        for l in layers:
            lr, Z = layer_table(acts[:, l], eps)
            plot_layer(lr, Z, values, period, store.dir / f"layer{l}.png",
                       title=f"{task}, {model}: residual at '{role}', layer {l}, coloured by {key}")
            out["files"].append(f"layer{l}.png")
            out["layers"][l] = lr
            echo(f"layer {l}: " + "; ".join(f"{r['pair']} M={r['mixture']:.3f} S={r['separability']:.3f}"
                                            for r in lr))
    (store.dir / "indices.json").write_text(json.dumps(out, indent=1, default=float))
    store.finish(files=out["files"])
    echo(f"results: {store.dir}")
    return out
