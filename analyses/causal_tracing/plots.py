"""Figures of causal tracing (matplotlib, Agg): ROME-style AIE heatmaps (token group x layer), per-layer
AIE lines with 95% bands, the severed-run comparison at the last subject token, and one fact's
token x layer map."""
from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from interpkit.analyses.causal_tracing.facts import GROUP_LABELS, GROUPS
from interpkit.plots import finish, pyplot

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "severed_mlp": "Blues", "severed_attn": "Oranges"}
TITLES = {"hidden": "single hidden state", "mlp": "MLP window", "attn": "attention window",
          "severed_mlp": "hidden state, MLP severed", "severed_attn": "hidden state, attention severed"}


def plot_heatmaps(result, out_dir) -> list[Path]:
    """One panel per kind: AIE of restoring at (token group, layer), as in ROME's average figure."""
    agg = result.aggregate()
    K = len(result.kinds)
    fig, axes = pyplot().subplots(1, K, figsize=(3.6 * K, 3.2), squeeze=False)
    for ki, kind in enumerate(result.kinds):
        ax = axes[0, ki]
        im = ax.imshow(agg["aie"][ki].numpy(), aspect="auto", cmap=CMAPS.get(kind, "viridis"), vmin=0)
        ax.set_yticks(range(len(GROUPS)), [GROUP_LABELS[g] for g in GROUPS] if ki == 0 else [""] * len(GROUPS))
        ax.set_xlabel("layer")
        ax.set_title(f"AIE: {TITLES.get(kind, kind)}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{len(result.facts)} facts, ATE = {float(agg['ate']):.3f}, noise {result.noise_level:.3g}",
                 fontsize=9)
    path = Path(out_dir) / "causal_trace_heatmap.png"
    finish(fig, path)
    return [path]


def plot_lines(result, out_dir) -> list[Path]:
    """Per kind, AIE over layers for each token group with 1.96-standard-error bands; plus the severed
    comparison at the last subject token when severed kinds were traced."""
    agg = result.aggregate()
    K = len(result.kinds)
    fig, axes = pyplot().subplots(1, K, figsize=(3.6 * K, 3.0), squeeze=False, sharey=True)
    layers = range(agg["aie"].shape[-1])
    for ki, kind in enumerate(result.kinds):
        ax = axes[0, ki]
        for gi, g in enumerate(GROUPS):
            if int(agg["n"][ki, gi].max()) == 0:
                continue
            ax.plot(layers, agg["aie"][ki, gi].numpy(), label=GROUP_LABELS[g])
            ax.fill_between(layers, agg["aie_lo"][ki, gi].numpy(), agg["aie_hi"][ki, gi].numpy(), alpha=0.2)
        ax.set_title(TITLES.get(kind, kind), fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("AIE")
    axes[0, -1].legend(fontsize=6)
    paths = [Path(out_dir) / "causal_trace_lines.png"]
    finish(fig, paths[0])
    if "hidden" in result.kinds and any(k in result.kinds for k in ("severed_mlp", "severed_attn")):
        paths.append(_plot_severed(result, agg, Path(out_dir) / "causal_trace_severed.png"))
    return paths


def _plot_severed(result, agg, path: Path) -> Path:
    g = GROUPS.index("last_subject")
    fig, ax = pyplot().subplots(figsize=(5, 3))
    layers = range(agg["aie"].shape[-1])
    for kind in ("hidden", "severed_attn", "severed_mlp"):
        if kind in result.kinds:
            k = result.kinds.index(kind)
            ax.plot(layers, agg["aie"][k, g].numpy(), label=TITLES[kind])
            ax.fill_between(layers, agg["aie_lo"][k, g].numpy(), agg["aie_hi"][k, g].numpy(), alpha=0.2)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("AIE at last subject token")
    ax.legend(fontsize=7)
    finish(fig, path)
    return path


def plot_fact(trace, path) -> Path:
    """One fact: restored probability at every (token, layer), one panel per kind (ROME's single-fact figure)."""
    K = len(trace.kinds)
    T = len(trace.tokens)
    fig, axes = pyplot().subplots(1, K, figsize=(3.2 * K, 0.3 * T + 1.5), squeeze=False)
    labels = [t + ("*" if trace.subject_first <= i <= trace.subject_last else "") for i, t in enumerate(trace.tokens)]
    for ki, kind in enumerate(trace.kinds):
        ax = axes[0, ki]
        im = ax.imshow(trace.scores[ki].numpy(), aspect="auto", cmap=CMAPS.get(kind, "viridis"),
                       vmin=trace.low)
        ax.set_yticks(range(T), labels if ki == 0 else [""] * T, fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(TITLES.get(kind, kind), fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"fact {trace.key}: p(answer) clean {trace.high:.3f}, corrupted {trace.low:.3f} (* = subject)",
                 fontsize=8)
    finish(fig, path)
    return Path(path)
