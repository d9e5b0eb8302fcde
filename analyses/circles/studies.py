"""Two more of Engels et al.'s (2024) circle experiments: their results and figures, and the feature
deconstruction (numpy only). ``analyses.circles.features`` runs the sweep (``circle_sweep``: it is an intervention
through the circle probe's forwards) and imports this module; nothing here imports it back.

**Intervening in the middle of the circle** (their Figure 6, ``intervene_in_middle_of_circle.py``): at one
layer, the start token's residual is set to the mean activation except in the probe's circle plane, where
it encodes the point r (cos t, sin t) -- for radii r (0 = the centre, 1 = the circle, > 1 outside) and
angles t swept from the angle of one value to that of another. If the model reads the circle, the answer
follows the angle: it moves from (from + b) to (to + b) somewhere between the two angles, at every radius
that is not too small. Reported per (r, t): the share of problems whose argmax answer implies the start
value ``from``, ``to`` or something else, and the mean logit(c_from) - logit(c_to).

**Residual "RGB" plots / feature deconstruction** (their Figures 8 and 16, ``feature_deconstruction/``):
the hidden state of every problem (a, b) at one layer and token, reduced to its top 3 PCA components,
shown as an image with a on one axis, b on the other and the components as red, green and blue (each
scaled to [0, 1] by its min and max). Then explanatory features are regressed out one after the other
(least squares on all problems): one-hot a, one-hot b, the circle of a, of b, of c = a + b mod p, ...;
the residual is plotted again after each step with the share of variance explained so far. What is left
after a step is what those features do not account for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from interpkit.errors import UserError
from interpkit.plots import finish, pyplot


# -- intervening in the middle of the circle ------------------------------------------------------------
@dataclass
class SweepResult:
    layer: int
    frm: int
    to: int
    radii: np.ndarray                 # [R]
    angles: np.ndarray                # [A] radians
    share_from: np.ndarray            # [R, A] argmax answer implies start value ``frm``
    share_to: np.ndarray              # [R, A]
    share_other: np.ndarray           # [R, A]
    logit_diff: np.ndarray            # [R, A] mean logit(c_from) - logit(c_to)
    implied: np.ndarray               # [R, A, N] implied start value per problem
    n_problems: int = 0
    timings: dict = field(default_factory=dict)

    def plot(self, path=None, task: str = ""):
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        deg = np.degrees(self.angles)
        ext = [deg[0], deg[-1], self.radii[0], self.radii[-1]]
        for ax, data, title, cmap in ((axes[0], self.share_to - self.share_from,
                                       f"share(to={self.to}) - share(from={self.frm})", "coolwarm"),
                                      (axes[1], self.logit_diff, "logit(c_from) - logit(c_to)", "PuOr")):
            vmax = float(np.nanmax(np.abs(data))) or 1.0
            im = ax.imshow(data, origin="lower", aspect="auto", extent=ext, cmap=cmap, vmin=-vmax, vmax=vmax)
            ax.set_xlabel("angle (degrees)")
            ax.set_ylabel("radius (1 = the circle)")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax)
        r1 = int(np.argmin(np.abs(self.radii - 1.0)))
        axes[2].plot(deg, self.share_from[r1], marker="o", label=f"implies from = {self.frm}")
        axes[2].plot(deg, self.share_to[r1], marker="s", label=f"implies to = {self.to}")
        axes[2].plot(deg, self.share_other[r1], marker="x", ls=":", label="other")
        axes[2].set_ylim(-0.02, 1.02)
        axes[2].set_xlabel("angle (degrees)")
        axes[2].set_title(f"at radius {self.radii[r1]:.2f}", fontsize=9)
        axes[2].legend(fontsize=7)
        fig.suptitle(f"{task}: intervening inside the circle at layer {self.layer} ({self.n_problems} problems)")
        return finish(fig, path)

    def table(self) -> str:
        """Share implying ``to`` per (radius, angle), as text."""
        deg = np.degrees(self.angles)
        lines = ["radius \\ angle " + " ".join(f"{d:6.0f}" for d in deg)]
        for i, r in enumerate(self.radii):
            lines.append(f"{r:14.2f} " + " ".join(f"{x:6.2f}" for x in self.share_to[i]))
        return "\n".join(lines)


# -- residual RGB plots and feature deconstruction -----------------------------------------------------
FEATURES = ("onehot_a", "onehot_b", "circle_a", "circle_b", "circle_c", "linear_b", "onehot_c")
DEFAULT_STEPS = ("circle_a", "circle_b", "circle_c", "onehot_a", "onehot_b")


def features(name: str, a: np.ndarray, b: np.ndarray, c: np.ndarray, p: int) -> np.ndarray:
    """Explanatory columns [N, k] of one feature family."""
    def circle(v):
        ang = 2 * np.pi * v / p
        return np.stack([np.cos(ang), np.sin(ang)], 1)

    def onehot(v):
        vals = np.unique(v)
        return (v[:, None] == vals[None]).astype(np.float64)

    table = {"onehot_a": lambda: onehot(a), "onehot_b": lambda: onehot(b), "onehot_c": lambda: onehot(c),
             "circle_a": lambda: circle(a), "circle_b": lambda: circle(b), "circle_c": lambda: circle(c),
             "linear_b": lambda: b[:, None].astype(np.float64)}
    if name not in table:
        raise UserError(f"unknown deconstruction feature {name!r}; use {', '.join(FEATURES)}")
    return table[name]()


def rgb_image(X: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image [n_a, n_b, 3] of the top-3 PCA components scaled to [0, 1], explained-variance ratios [3])."""
    Xc = X - X.mean(0)
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    k = min(3, Vt.shape[0])
    Z = Xc @ Vt[:k].T
    if k < 3:
        Z = np.concatenate([Z, np.zeros((len(Z), 3 - k))], 1)
    lo, hi = Z.min(0), Z.max(0)
    Z = (Z - lo) / np.where(hi - lo > 0, hi - lo, 1.0)
    av, bv = np.unique(a), np.unique(b)
    img = np.full((len(av), len(bv), 3), np.nan)
    img[np.searchsorted(av, a), np.searchsorted(bv, b)] = Z
    var = S ** 2
    ratio = np.zeros(3)
    ratio[:k] = var[:k] / max(var.sum(), 1e-30)
    return img, ratio


@dataclass
class Deconstruction:
    layer: int
    role: str
    steps: list[str]                  # "none", then the cumulative features
    r2: list[float]                   # share of variance explained after each step
    images: list[np.ndarray]          # RGB of the residual after each step
    pca_ratios: list[np.ndarray]

    def plot(self, path=None, task: str = "", a_label: str = "a (start)", b_label: str = "b (duration)"):
        plt = pyplot()
        n = len(self.steps)
        fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.3), squeeze=False)
        for ax, step, r2, img, ratio in zip(axes[0], self.steps, self.r2, self.images, self.pca_ratios):
            ax.imshow(np.nan_to_num(img, nan=1.0), origin="lower")
            ax.set_title(f"{'raw' if step == 'none' else '- ' + step}\nR²={r2:.3f}, PCs {100 * ratio.sum():.0f}%",
                         fontsize=8)
            ax.set_xlabel(b_label, fontsize=8)
            ax.set_ylabel(a_label, fontsize=8)
        fig.suptitle(f"{task}: residual RGB (top-3 PCs) at layer {self.layer}, token '{self.role}', "
                     f"after regressing out features cumulatively", fontsize=9)
        return finish(fig, path)


def deconstruct(X: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, p: int,
                steps=DEFAULT_STEPS, layer: int = 0, role: str = "end") -> Deconstruction:
    """RGB image of X [N, d] and of its residual after regressing out ``steps`` one after the other."""
    X = np.asarray(X, dtype=np.float64)
    total = ((X - X.mean(0)) ** 2).sum()
    cols = [np.ones((len(X), 1))]
    names, r2s, imgs, ratios = ["none"], [0.0], [], []
    img, ratio = rgb_image(X, a, b)
    imgs.append(img), ratios.append(ratio)
    for name in steps:
        cols.append(features(name, a, b, c, p))
        E = np.concatenate(cols, 1)
        coef, *_ = np.linalg.lstsq(E, X, rcond=None)
        resid = X - E @ coef
        names.append(name)
        r2s.append(float(1 - (resid ** 2).sum() / max(total, 1e-30)))
        img, ratio = rgb_image(resid, a, b)
        imgs.append(img), ratios.append(ratio)
    return Deconstruction(layer=layer, role=role, steps=names, r2=r2s, images=imgs, pca_ratios=ratios)
