"""The paper's studies on top of traced graphs (Franco & Crovella 2025, Steps 3-6 of their README).

- **Sparse attention decomposition** (``sparsity_table``, ``plot_sparsity``): how many of Omega's d_head
  singular components each traced edge side needs, per layer and head, against the rank.
- **Control signals** (``firing_signals``, ``control_heads``, ``cluster_signals``, ``plot_control``): for
  every firing (attention >= ``attn_thresh``, above uniform) the signal as the normalised projection of the
  head's input on the selected subspace (query side: the destination's input on U_S; key side: the
  source's on V_S). A head is *controlled* when its firings on the default token(s) (position 0 by
  default: the first token, where heads "park" attention) use nearly the same signal across prompts
  (mean pairwise cosine distance < ``similarity``; the paper's 0.5); the control signal is their mean.
  All signals are clustered (average linkage, cosine distance, cut at ``cluster_threshold``; the paper's
  0.97); the largest cluster is scored as a classifier of default-token firings, and the inner products
  with its prototype (the member closest on average to the others) are compared between default and
  other firings.
- **Threshold sweep** (``threshold_sweep``): for |mean delta logit diff| thresholds, the pruned circuit's
  size, its faithfulness (heads outside it mean-ablated: (LD_C - LD_0) / (LD_M - LD_0), LD_0 with every
  head ablated; also LD_C / LD_M) and, given a reference, precision / recall / F1.
- ``plot_compare``: precision / recall / F1 bars against one or more reference circuits.
"""
from __future__ import annotations

import numpy as np

from interpkit.plots import finish, pyplot


# -- sparse attention decomposition ------------------------------------------------------------------
def sparsity_table(records: list[dict]):
    """Per (layer, head, side): edges with a signal, mean / median number of components, rank, fraction."""
    import pandas as pd

    df = pd.DataFrame(records)
    if not len(df):
        return pd.DataFrame(columns=["layer", "head", "side", "edges", "mean", "median", "rank", "fraction"])
    df = df[df.n_selected > 0]
    g = df.groupby(["layer", "head", "side"])
    out = g.n_selected.agg(edges="count", mean="mean", median="median").reset_index()
    out["rank"] = g["rank"].first().values
    out["fraction"] = out["mean"] / out["rank"]
    return out


def plot_sparsity(records: list[dict], path=None, n_layers: int | None = None, n_heads: int | None = None):
    """Top: per layer, the distribution of components used (query and key side) vs the rank. Bottom:
    layer x head heatmaps of the mean fraction of the rank used."""
    import pandas as pd

    plt = pyplot()
    df = pd.DataFrame(records)
    df = df[df.n_selected > 0]
    rank = int(df["rank"].max()) if len(df) else 1
    L = n_layers or (int(df.layer.max()) + 1 if len(df) else 1)
    H = n_heads or (int(df["head"].max()) + 1 if len(df) else 1)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for c, (side, name) in enumerate((("q", "query (destination) side"), ("k", "key (source) side"))):
        ax = axes[0, c]
        d = df[df.side == side]
        data = [d[d.layer == l].n_selected.values for l in range(L)]
        pos = [l for l in range(L) if len(data[l])]
        if pos:
            ax.violinplot([data[l] for l in pos], positions=pos, showmedians=True, widths=0.8)
        ax.axhline(rank, color="k", ls="--", lw=1, label=f"rank (d_head = {rank})")
        ax.set_xlabel("layer")
        ax.set_ylabel("singular components used")
        ax.set_title(f"{name}: {len(d)} edges, mean {d.n_selected.mean() if len(d) else float('nan'):.2f}")
        ax.set_ylim(0, rank + 1)
        ax.legend(fontsize=7)
        grid = np.full((L, H), np.nan)
        t = sparsity_table(records)
        for r in t[t.side == side].itertuples():
            grid[int(r.layer), int(r.head)] = r.fraction
        im = axes[1, c].imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axes[1, c].set_xticks(range(H))
        axes[1, c].set_yticks(range(L))
        axes[1, c].set_xlabel("head")
        axes[1, c].set_ylabel("layer")
        axes[1, c].set_title("mean components / rank")
        fig.colorbar(im, ax=axes[1, c])
    fig.suptitle("sparse attention decomposition")
    return finish(fig, path)


# -- control signals ------------------------------------------------------------------------------------
def firing_signals(lm, omega, prompts, pids: list[int], attn_thresh: float = 0.4, share: float = 1.0,
                   decimals: int | None = 5, sides=("q", "k"), decs: dict | None = None, progress=None):
    """(DataFrame of firings, unit signal vectors [F, d] float64) for every head, dest >= 1 and source with
    A[d, s] >= max(attn_thresh, 1 / (d + 1)) in prompts ``pids`` (one activation trace for all)."""
    import pandas as pd

    from interpkit.analyses.attention_tracing.interventions import decompose_prompts
    from interpkit.analyses.attention_tracing.signals import edge_signal

    decs = decompose_prompts(lm, omega, prompts, pids, decs)
    rows, vecs = [], []
    L = lm.arch.n_layers
    for pid in pids:
        dec = decs[pid]
        for layer in range(L):
            for d in range(1, dec.n):
                A = dec.A[layer, :, d, : d + 1]
                hits = ((A >= attn_thresh) & (A >= 1.0 / (d + 1))).nonzero().tolist()
                for head, s in hits:
                    for side in sides:
                        sig = edge_signal(omega, dec, layer, head, d, s, side, share, decimals)
                        if len(sig.selected) == 0:
                            continue
                        x = dec.xhat[layer, d if side == "q" else s]
                        v = sig.basis @ (sig.basis.T @ x)
                        nrm = float(v.norm())
                        if nrm == 0:
                            continue
                        rows.append(dict(prompt=pid, layer=layer, head=head, dest=d, src=s, side=side,
                                         attention=float(A[head, s]), n_selected=len(sig.selected)))
                        vecs.append((v / nrm).numpy())
        if progress is not None:
            progress()
    d_model = lm.arch.d_model
    return pd.DataFrame(rows), (np.stack(vecs) if vecs else np.zeros((0, d_model)))


def _cos_dist(X: np.ndarray) -> np.ndarray:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-12)
    return np.clip(1.0 - Xn @ Xn.T, 0.0, 2.0)


def control_heads(firings, vectors: np.ndarray, default_src=(0,), similarity: float = 0.5, side: str = "k"):
    """Per head: firings on the default source(s), mean pairwise cosine distance of their signals, whether
    the head is controlled (< ``similarity``, >= 2 firings), and the control signal (mean) of each one."""
    import pandas as pd

    f = firings.reset_index(drop=True)
    m = (f.side == side) & f.src.isin(list(default_src))
    rows, signals = [], {}
    for (layer, head), g in f[m].groupby(["layer", "head"]):
        V = vectors[g.index.values]
        if len(V) > 1:
            D = _cos_dist(V)
            dist = float(D[np.triu_indices(len(V), 1)].mean())
        else:
            dist = float("nan")
        controlled = bool(len(V) > 1 and dist < similarity)
        rows.append(dict(layer=int(layer), head=int(head), n_default=len(V), mean_cos_dist=dist,
                         controlled=controlled))
        if controlled:
            signals[(int(layer), int(head))] = V.mean(0)
    return pd.DataFrame(rows, columns=["layer", "head", "n_default", "mean_cos_dist", "controlled"]), signals


def average_linkage(X: np.ndarray, threshold: float) -> np.ndarray:
    """Flat clusters (labels 0.., largest first) of rows of X: average-linkage agglomeration on cosine
    distance, merging while the closest pair of clusters is within ``threshold`` (average linkage is
    monotone, so this equals cutting the full dendrogram at that height)."""
    n = len(X)
    if n == 0:
        return np.zeros(0, dtype=int)
    D = _cos_dist(X).astype(np.float64)
    np.fill_diagonal(D, np.inf)
    size = np.ones(n)
    members = {i: [i] for i in range(n)}
    alive = np.ones(n, dtype=bool)
    while alive.sum() > 1:
        i, j = np.unravel_index(np.argmin(D), D.shape)
        if D[i, j] > threshold:
            break
        i, j = min(i, j), max(i, j)
        new = (size[i] * D[i] + size[j] * D[j]) / (size[i] + size[j])      # Lance-Williams, average
        D[i, :], D[:, i] = new, new
        D[i, i] = np.inf
        D[j, :], D[:, j] = np.inf, np.inf
        size[i] += size[j]
        alive[j] = False
        members[i] += members.pop(j)
    groups = sorted(members.values(), key=lambda g: (-len(g), min(g)))
    labels = np.empty(n, dtype=int)
    for c, g in enumerate(groups):
        labels[g] = c
    return labels


def cluster_signals(firings, vectors: np.ndarray, default_src=(0,), threshold: float = 0.97, side: str = "k"):
    """Cluster one side's signals; score the largest cluster as a detector of default-token firings.

    Returns dict(labels, index (rows of ``firings``), tp, fp, fn, tn, precision, recall, prototype,
    ip_default, ip_other, src_counts (per cluster, the source positions of its firings))."""
    f = firings.reset_index(drop=True)
    idx = f.index[f.side == side].values
    V = vectors[idx]
    labels = average_linkage(V, threshold)
    is_default = f.loc[idx, "src"].isin(list(default_src)).values
    in0 = labels == 0
    tp, fp = int((in0 & is_default).sum()), int((in0 & ~is_default).sum())
    fn, tn = int((~in0 & is_default).sum()), int((~in0 & ~is_default).sum())
    proto = np.zeros(vectors.shape[1])
    if in0.any():
        C = V[in0]
        proto = C[int(np.argmin(_cos_dist(C).mean(1)))]
    ips = V @ proto
    counts = [dict(f.loc[idx[labels == c], "src"].value_counts().sort_index()) for c in range(int(labels.max()) + 1)] \
        if len(labels) else []
    return dict(labels=labels, index=idx, tp=tp, fp=fp, fn=fn, tn=tn,
                precision=tp / (tp + fp) if tp + fp else float("nan"),
                recall=tp / (tp + fn) if tp + fn else float("nan"), prototype=proto,
                ip_default=ips[is_default], ip_other=ips[~is_default],
                src_counts=[{int(k): int(v) for k, v in c.items()} for c in counts])


def plot_control(heads, clusters: dict, vectors: np.ndarray, n_layers: int, n_heads: int, path=None,
                 similarity: float = 0.5):
    """Three panels: per-head mean cosine distance of default-token signals (controlled heads marked),
    the cosine-distance matrix ordered by cluster, inner products with the prototype."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    grid = np.full((n_layers, n_heads), np.nan)
    for r in heads.itertuples():
        grid[r.layer, r.head] = r.mean_cos_dist
    im = axes[0].imshow(grid, cmap="magma_r", vmin=0, vmax=1.2, aspect="auto")
    for r in heads[heads.controlled].itertuples():
        axes[0].text(r.head, r.layer, "C", ha="center", va="center", color="cyan", fontsize=8, weight="bold")
    axes[0].set_xticks(range(n_heads))
    axes[0].set_yticks(range(n_layers))
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("layer")
    axes[0].set_title(f"default-token signals: mean cosine distance\n(C: controlled, < {similarity})", fontsize=9)
    fig.colorbar(im, ax=axes[0])
    idx, labels = clusters["index"], clusters["labels"]
    if len(idx):
        order = np.argsort(labels, kind="stable")
        D = _cos_dist(vectors[idx][order])
        im2 = axes[1].imshow(D, cmap="viridis", vmin=0, vmax=1.5)
        fig.colorbar(im2, ax=axes[1])
    axes[1].set_title(f"cosine distances of {len(idx)} signals, ordered by cluster\n"
                      f"largest cluster vs default-token firings: P {clusters['precision']:.2f}, "
                      f"R {clusters['recall']:.2f}", fontsize=9)
    bins = np.linspace(-1, 1, 41)
    axes[2].hist(clusters["ip_default"], bins=bins, alpha=0.6, density=True, label="default-token firings")
    axes[2].hist(clusters["ip_other"], bins=bins, alpha=0.6, density=True, label="other firings")
    axes[2].set_xlabel("inner product with the prototype signal")
    axes[2].legend(fontsize=7)
    axes[2].set_title("control-signal prototype", fontsize=9)
    return finish(fig, path)


# -- threshold sweep and comparison ---------------------------------------------------------------
def head_ablation_logit_diffs(lm, prompts, keep_sets: list[set], progress=None) -> np.ndarray:
    """Mean logit difference over ``prompts`` with every head outside each keep set mean-ablated
    (its output replaced by its mean over prompts and positions), [len(keep_sets)]."""
    from interpkit.analyses.attention_tracing.faithfulness import ablated_logit_diff, head_means

    means = head_means(lm, prompts)
    out = []
    for keep in keep_sets:
        out.append(ablated_logit_diff(lm, prompts, means, keep))
        if progress is not None:
            progress()
    return np.array(out)


def threshold_sweep(lm, prompts, unified, effects, thresholds, min_prompts: int, reference: set | None = None,
                    include_mlp: bool = False, progress=None):
    """One row per threshold: nodes, edges, heads, faithfulness (normalised and raw), P/R/F1."""
    import pandas as pd

    from interpkit.analyses.attention_tracing import graphs as gr

    rows, keeps = [], []
    for th in thresholds:
        C = gr.prune_circuit(unified, effects, min_prompts=min_prompts, min_effect=th)
        heads = {c for c in gr.circuit_components(C)}
        row = dict(threshold=float(th), nodes=C.number_of_nodes(), edges=C.number_of_edges(), heads=len(heads),
                   head_list=" ".join(f"{l}.{h}" for l, h in sorted(heads)))
        if reference is not None:
            s = gr.compare(gr.circuit_components(C, include_mlp=include_mlp), reference)
            row.update(precision=s["precision"], recall=s["recall"], f1=s["f1"])
        rows.append(row)
        keeps.append(heads)
    all_heads = {(l, h) for l in range(lm.arch.n_layers) for h in range(lm.arch.n_heads)}
    ld = head_ablation_logit_diffs(lm, prompts, [all_heads, set()] + keeps, progress=progress)
    ld_m, ld_0 = ld[0], ld[1]
    df = pd.DataFrame(rows)
    df["logit_diff"] = ld[2:]
    df["faithfulness"] = (ld[2:] - ld_0) / (ld_m - ld_0) if ld_m != ld_0 else np.nan
    df["ratio"] = ld[2:] / ld_m if ld_m else np.nan
    df.attrs.update(model_logit_diff=float(ld_m), ablated_logit_diff=float(ld_0))
    return df


def plot_sweep(df, path=None, title: str = ""):
    plt = pyplot()
    has_ref = "f1" in df
    fig, axes = plt.subplots(1, 3 if has_ref else 2, figsize=(14 if has_ref else 9.5, 3.8))
    x = df.threshold
    axes[0].plot(x, df.heads, marker="o", label="heads")
    axes[0].plot(x, df.edges, marker="s", label="edges")
    axes[0].set_ylabel("circuit size")
    axes[1].plot(x, df.faithfulness, marker="o", label="(LD_C - LD_0) / (LD_M - LD_0)")
    axes[1].plot(x, df.ratio, marker="s", ls="--", label="LD_C / LD_M")
    axes[1].axhline(1, color="grey", lw=1, ls=":")
    axes[1].set_ylabel("faithfulness")
    if has_ref:
        for k in ("precision", "recall", "f1"):
            axes[2].plot(x, df[k], marker="o", label=k)
        axes[2].set_ylim(-0.02, 1.02)
        axes[2].set_ylabel("vs reference")
    for ax in axes:
        ax.set_xlabel("|mean delta logit diff| threshold")
        ax.legend(fontsize=7)
    fig.suptitle(title or "threshold sweep")
    return finish(fig, path)


def plot_compare(scores: dict, path=None, title: str = ""):
    """Grouped bars of precision / recall / F1, one group per reference name."""
    plt = pyplot()
    names = list(scores)
    fig, ax = plt.subplots(figsize=(1.5 + 2.2 * len(names), 3.6))
    w = 0.26
    for k, metric in enumerate(("precision", "recall", "f1")):
        vals = [scores[n][metric] for n in names]
        bars = ax.bar(np.arange(len(names)) + (k - 1) * w, vals, w, label=metric)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7)
    ax.set_title(title or "traced circuit vs reference circuits")
    return finish(fig, path)
