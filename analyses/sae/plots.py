"""Figures of SAE cluster reconstructions: top PCA components, coloured by token."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from interpkit.plots import finish, pyplot


def plot_cluster(rec, token_strings: list[str], values: dict[str, torch.Tensor], path: str | Path,
                 title: str = "") -> Path:
    """PC1-PC2 and PC2-PC3 of a cluster reconstruction; days / months coloured by their value on a
    cyclic map, the three most frequent other tokens in their own colours, the rest grey."""
    plt = pyplot()
    Z = rec.pcs.numpy()
    rows = rec.rows
    n_pairs = 2 if Z.shape[1] >= 3 else 1
    fig, axes = plt.subplots(1, n_pairs, figsize=(5.2 * n_pairs, 4.4), squeeze=False)
    days, months = values["days"][rows], values["months"][rows]
    cyc = days >= 0
    kind = "days"
    if int((months >= 0).sum()) > int(cyc.sum()):
        cyc, kind = months >= 0, "months"
    vals = (days if kind == "days" else months)[cyc]
    period = 7 if kind == "days" else 12
    others = [t.strip(" Ġ▁") for t, c in zip(token_strings, cyc.tolist()) if not c]
    common = [w for w, _ in Counter(others).most_common(3)]
    for a in range(n_pairs):
        ax = axes[0, a]
        grey = ~cyc.numpy()
        ax.scatter(Z[grey, a], Z[grey, a + 1], s=6, c="lightgrey", label="other")
        for j, w in enumerate(common):
            m = [not c and t.strip(" Ġ▁") == w for t, c in zip(token_strings, cyc.tolist())]
            ax.scatter(Z[m, a], Z[m, a + 1], s=8, color=f"C{j}", label=repr(w))
        if bool(cyc.any()):
            sc = ax.scatter(Z[cyc.numpy(), a], Z[cyc.numpy(), a + 1], s=14, c=vals.numpy(), cmap="hsv",
                            vmin=0, vmax=period, label=kind)
            if a == n_pairs - 1:
                fig.colorbar(sc, ax=ax, label=f"{kind} index")
        ax.set_xlabel(f"PC{a + 1}")
        ax.set_ylabel(f"PC{a + 2}")
        ax.legend(fontsize=7, markerscale=2)
    fig.suptitle(title)
    return finish(fig, path)
