"""Part 1 probes: are the CFG's DP states linearly decodable from the residual stream, layer by layer?

Fresh strings with a *unique* parse (so the labels are a function of the string) are run through the
model; at every terminal position and every layer (0 = embeddings) a logistic probe
(``analyses.probing.linear``, prompt-level split) decodes, for each NT level k:

- ``anc{k}``: the level-k NT ancestor of the position,
- ``bnd{k}``: whether the position ends a level-k subtree (the NT boundary),
- ``ancend{k}``: the level-k ancestor at the positions that end a level-k subtree (the paper's
  "NT ancestor at the NT end", where the DP state is determined by the prefix).

The same probes on the same architecture with random weights are the baseline; layer 0 is the
embedding-only baseline.
"""
from __future__ import annotations

from dataclasses import dataclass


from interpkit.analyses.probing.linear import ProbeConfig, ProbeResult, probe_layers, random_like
from interpkit.plots import finish, pyplot


@dataclass
class CFGProbeResult:
    trained: ProbeResult
    random: ProbeResult | None
    n_strings: int
    unique_frac: float             # fraction of sampled strings with a unique parse

    def table(self) -> str:
        lines = [f"{'target':>8} {'chance':>6} | trained by layer | random by layer"]
        for i, t in enumerate(self.trained.targets):
            tr = " ".join(f"{float(x):.3f}" for x in self.trained.test_acc[i])
            rd = " ".join(f"{float(x):.3f}" for x in self.random.test_acc[i]) if self.random else "-"
            lines.append(f"{t:>8} {float(self.trained.chance[i]):>6.3f} | {tr} | {rd}")
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd

        df = self.trained.to_dataframe().assign(model="trained")
        if self.random is not None:
            df = pd.concat([df, self.random.to_dataframe().assign(model="random init")])
        return df


def unique_samples(grammar, n: int, seed: int) -> tuple[list, float]:
    from interpkit.tasks.cfg import parse, sample

    out, drawn, s = [], 0, seed
    while len(out) < n:
        for smp in sample(grammar, 64, s):
            drawn += 1
            if parse(grammar, smp.tokens).n_parses == 1 and len(out) < n:
                out.append(smp)
        s += 1
    return out, n / drawn


def probe_cfg(lm, grammar, *, n: int = 300, seed: int = 4242, random_baseline: bool = True,
              cfg: ProbeConfig | None = None) -> CFGProbeResult:
    from interpkit.tasks.cfg import dp_labels, encode

    samples, frac = unique_samples(grammar, n, seed)
    enc = encode(samples)
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    labels = dp_labels(samples, enc["input_ids"].shape[1], grammar.depth)
    cfg = cfg or ProbeConfig(seed=0, max_iter=200, max_train_rows=20_000)
    trained = probe_layers(lm, inputs, labels, positions="all", cfg=cfg)
    rnd = probe_layers(random_like(lm, 0), inputs, labels, positions="all", cfg=cfg) if random_baseline else None
    return CFGProbeResult(trained, rnd, n, frac)


def plot_cfg_probes(res: CFGProbeResult, path, title: str = "CFG DP-state probes") -> None:
    """One panel per label kind (anc, bnd, ancend): test accuracy by layer, trained solid vs random dashed."""
    plt = pyplot()
    kinds = ("anc", "bnd", "ancend")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, kind in zip(axes, kinds):
        for i, t in enumerate(res.trained.targets):
            if not (t.startswith(kind) and t[len(kind):].isdigit()):
                continue
            line, = ax.plot(res.trained.layers, res.trained.test_acc[i].numpy(), marker="o", label=f"level {t[len(kind):]}")
            if res.random is not None:
                ax.plot(res.random.layers, res.random.test_acc[i].numpy(), ls="--", color=line.get_color(), alpha=0.7)
            ax.axhline(float(res.trained.chance[i]), ls=":", color=line.get_color(), alpha=0.5)
        ax.set_title({"anc": "NT ancestor (all positions)", "bnd": "NT boundary",
                      "ancend": "NT ancestor at NT ends"}[kind])
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, title="solid trained, dashed random", title_fontsize=7)
    axes[0].set_ylabel("probe test accuracy")
    fig.suptitle(title)
    finish(fig, path)
