"""Parts 2.1 / 2.2 probes on iGSM models.

V-probes (``analyses.probing.vprobe.fit_vprobe``: frozen model, rank-8 update of the input embeddings, linear
head on the last hidden state) of properties of a quantity A, asked by cutting the text at a probe point
and appending ``<p> A </p>`` (``<p> A B </p>`` for dep), as in the paper:

- ``nece@question``: is A necessary for the answer? (cut after the question)
- ``dep@statements``: does A depend (transitively) on B? (cut after the last statement, before the question)
- ``nece@solution``: is a not-yet-computed A necessary? (cut after a random solution step)
- ``can_next@solution``: are all operands of a not-yet-computed, non-leaf A already computed?
- ``value@solution``: the value of an already computed A (retrieval)
- ``value@question``: the value of a necessary non-leaf A before the solution starts (mental computation)

Part 2.2, ``mistake_probe``: a solution prefix ending with a correct step vs the same prefix ending with a
wrong step (a necessary quantity computed before its operands are known); a linear probe per layer on the
last token ("this step is wrong"), on a model trained only on error-free solutions. Each problem gives
one pair, so the prompt-level split keeps both members on the same side. Random weights are the baseline
for both.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch

from interpkit.analyses.probing.vprobe import VProbeConfig, fit_vprobe
from interpkit.analyses.probing.linear import ProbeConfig, collect_residuals, probe_activations, prompt_split, random_like
from interpkit.plots import finish, pyplot

TARGETS = ("nece@question", "dep@statements", "nece@solution", "can_next@solution", "value@solution",
           "value@question")


def probe_items(problems, target: str, seed: int = 0) -> tuple[list[list[str]], list[int]]:
    """(token lists ending in the probe suffix, labels) for one target, one item per usable problem."""
    rng = random.Random(seed)
    seqs, labels = [], []
    for pr in problems:
        n = len(pr.names)
        cut = rng.randrange(len(pr.solution))                      # steps already written
        end = pr.q_end if cut == 0 else pr.step_ends[cut - 1]
        done = set(pr.solution[:cut])
        item = None
        if target == "nece@question":
            a = rng.choice([q for q in range(n) if q != pr.question])
            item = (pr.tokens[:pr.q_end + 1], [a], int(a in pr.necessary))
        elif target == "dep@statements":
            a = rng.choice([q for q in range(n) if pr.operands[q]])
            pos = sorted(pr.depends[a])
            neg = [q for q in range(n) if q != a and q not in pr.depends[a]]
            b = rng.choice(pos) if (rng.random() < 0.5 and pos) or not neg else rng.choice(neg)
            item = (pr.tokens[:pr.stmt_end + 1], [a, b], int(b in pr.depends[a]))
        elif target == "nece@solution":
            cands = [q for q in range(n) if q not in done and q != pr.question]
            if cands:
                a = rng.choice(cands)
                item = (pr.tokens[:end + 1], [a], int(a in pr.necessary))
        elif target == "can_next@solution":
            cands = [q for q in range(n) if q not in done and pr.operands[q]]
            if cands:
                a = rng.choice(cands)
                item = (pr.tokens[:end + 1], [a], int(all(o in done for o in pr.operands[a])))
        elif target == "value@solution":
            if cut == 0:
                cut, end = 1, pr.step_ends[0]
            a = rng.choice(pr.solution[:cut])
            item = (pr.tokens[:end + 1], [a], pr.values[a])
        elif target == "value@question":
            cands = [q for q in pr.necessary if pr.operands[q]]
            if cands:
                a = rng.choice(cands)
                item = (pr.tokens[:pr.q_end + 1], [a], pr.values[a])
        else:
            from interpkit.errors import UserError
            raise UserError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
        if item is not None:
            prefix, qs, y = item
            seqs.append(list(prefix) + ["<p>"] + [pr.names[q] for q in qs] + ["</p>"])
            labels.append(y)
    return seqs, labels


def left_pad(tok, seqs: list[list[str]]) -> dict[str, torch.Tensor]:
    rows = [tok.convert_tokens_to_ids(s) for s in seqs]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class VProbeRow:
    target: str
    trained: float
    random: float | None
    chance: float
    n: int
    train_acc: float = float("nan")


def _plain_models(lm, random_baseline: bool):
    """Unwrapped copies (trained, random init) of a local model: V-probes train through the model many
    times, and the nnsight wrappers on every module call cost more than these tiny forwards."""
    import transformers as T

    hf = T.AutoModelForCausalLM.from_config(lm.hf.config, attn_implementation="sdpa")
    hf.load_state_dict(lm.hf.state_dict())
    rnd = None
    if random_baseline:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            rnd = T.AutoModelForCausalLM.from_config(lm.hf.config, attn_implementation="sdpa")
    return hf.eval(), (rnd.eval() if rnd is not None else None)


def igsm_vprobes(lm, icfg, targets=TARGETS, *, n: int = 200, seed: int = 555, random_baseline: bool = True,
                 vcfg: VProbeConfig | None = None, progress: bool = True) -> list[VProbeRow]:
    from rich.progress import track

    from interpkit.tasks.igsm import sample_problems

    vcfg = vcfg or VProbeConfig(steps=60, batch_size=32, seed=0)      # cut down for CPU time
    problems = sample_problems(icfg, n, seed)
    hf, rnd_hf = _plain_models(lm, random_baseline)
    out = []
    for t in (track(list(targets), description="V-probes") if progress else targets):
        seqs, labels = probe_items(problems, t, seed)
        inputs = left_pad(lm.tokenizer, seqs)
        classes, y = torch.unique(torch.tensor(labels), return_inverse=True)
        train, test = prompt_split(len(y), vcfg.test_frac, vcfg.seed)
        fit = fit_vprobe(hf, inputs, y, train, test, vcfg, len(classes))
        base = fit_vprobe(rnd_hf, inputs, y, train, test, vcfg, len(classes)).test_acc if rnd_hf is not None else None
        chance = float((y[test] == torch.mode(y[train]).values).float().mean())
        out.append(VProbeRow(t, fit.test_acc, base, chance, len(y), fit.train_acc))
        print(f"  {t}: trained {fit.test_acc:.3f}, random {base}, chance {chance:.3f}", flush=True)
    return out


@dataclass
class MistakeProbeResult:
    trained: object               # ProbeResult (targets ["wrong"], per layer)
    random: object | None
    n_pairs: int
    extra: dict = field(default_factory=dict)


def mistake_pairs(icfg, n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """(prefix ending with the correct step j, same prefix ending with a wrong step at j), equal lengths."""
    from interpkit.tasks.igsm import sample_problems, step_tokens, wrong_step

    rng = random.Random(seed)
    pairs = []
    for pr in sample_problems(icfg, n * 2, seed):
        # the correct step j computes a non-leaf too: both prompts have the same length (no position cue)
        js = [j for j in range(len(pr.solution)) if pr.operands[pr.solution[j]]
              and wrong_step(pr, j, random.Random(0), icfg.p) is not None]
        if not js:
            continue
        j = rng.choice(js)
        q, fake = wrong_step(pr, j, rng, icfg.p)
        before = pr.tokens[:(pr.q_end if j == 0 else pr.step_ends[j - 1]) + 1]
        pairs.append((pr.tokens[:pr.step_ends[j] + 1], before + step_tokens(pr, q, fake, icfg.p)))
        if len(pairs) == n:
            break
    return pairs


def mistake_probe(lm, icfg, *, n: int = 300, seed: int = 777, random_baseline: bool = True) -> MistakeProbeResult:
    pairs = mistake_pairs(icfg, n, seed)
    flat = [s for pair in pairs for s in pair]
    rows = [lm.tokenizer.convert_tokens_to_ids(s) for s in flat]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):                    # right-padded: learned positions stay exact
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    last = mask.sum(1) - 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    cfg = ProbeConfig(seed=0, max_iter=200)

    def run(model):
        acts = collect_residuals(model, inputs, last)                  # [2P, L, d]
        acts = acts.reshape(len(pairs), 2, *acts.shape[1:]).transpose(1, 2)   # [P, L, 2, d]
        labels = torch.tensor([[0, 1]] * len(pairs))
        return probe_activations(acts, {"wrong": labels}, cfg)

    trained = run(lm)
    rnd = run(random_like(lm, 0)) if random_baseline else None
    return MistakeProbeResult(trained, rnd, len(pairs))


def vprobe_table(rows: list[VProbeRow]) -> str:
    lines = [f"{'target':<20} {'trained':>8} {'random':>8} {'chance':>8} {'n':>5}"]
    for r in rows:
        rd = f"{r.random:.3f}" if r.random is not None else "-"
        lines.append(f"{r.target:<20} {r.trained:>8.3f} {rd:>8} {r.chance:>8.3f} {r.n:>5}")
    return "\n".join(lines)


def rows_dicts(rows: list[VProbeRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot_vprobes(groups: dict[str, list[VProbeRow]], path, title: str = "iGSM V-probes") -> None:
    """Grouped bars per target: test accuracy of each model (e.g. deep, wide) and its random-init copy."""
    plt = pyplot()
    targets = [r.target for r in next(iter(groups.values()))]
    n = len(groups)
    width = 0.8 / (2 * n)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(targets)), 4))
    for g, (name, rows) in enumerate(groups.items()):
        by = {r.target: r for r in rows}
        xs = [i + (2 * g - n) * width + width / 2 for i in range(len(targets))]
        ax.bar(xs, [by[t].trained for t in targets], width, color=f"C{g}", label=f"{name} trained")
        ax.bar([x + width for x in xs], [by[t].random if by[t].random is not None else 0 for t in targets], width,
               color=f"C{g}", alpha=0.35, label=f"{name} random init")
        for i, t in enumerate(targets):
            ax.plot([i - 0.4, i + 0.4], [by[t].chance] * 2, color="k", ls=":", lw=1)
    ax.set_xticks(range(len(targets)), targets, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("V-probe test accuracy (dotted: majority class)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    finish(fig, path)


def plot_layers(curves: dict[str, list[float]], chance: float, path, title: str) -> None:
    """Probe test accuracy by layer, one line per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, acc) in enumerate(curves.items()):
        ax.plot(range(len(acc)), acc, marker="o", color=f"C{i // 2}", ls="-" if i % 2 == 0 else "--", label=name)
    ax.axhline(chance, color="k", ls=":", label="majority class")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("probe test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    finish(fig, path)
