"""State tracking (seed 000, Li, Guo & Andreas 2025): reading the AA/PAA signature.

Pairs (``tasks.permutations.parity_pairs``) replace the first action a_0 of a story by another action
of the same or of the other parity; the final state changes either way. Following the seed, activations of the altered story are written
into the original one (``direction="noise"`` in patching terms: base = original, source = altered), so
the normalised effect is 1 where the patch flips the answer to the altered story's state.

The signature (paper §4–5): a parity-associative model (PAA) makes parity linearly decodable in early
layers, before the state; an associative-scan model (AA) makes state and parity decodable at the same
(late) layer, and its prefix-patching boundary moves with depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DECODABLE = 0.9


def first_decodable_layer(acc: torch.Tensor, threshold: float = DECODABLE) -> int | None:
    """The first layer whose probe accuracy reaches ``threshold`` (None if none does)."""
    hits = (acc >= threshold).nonzero()
    return int(hits[0]) if len(hits) else None


def prefix_boundary(effect: torch.Tensor, positions: list[int], level: float = 0.5) -> list[int | None]:
    """Per layer, the shortest prefix (last position patched) whose mean effect reaches ``level``."""
    out = []
    for row in effect:
        hit = (row >= level).nonzero()
        out.append(positions[int(hit[0])] if len(hit) else None)
    return out


@dataclass
class Signature:
    """Which algorithm the evidence favours, and why, in numbers."""

    verdict: str                    # "AA", "PAA", "sequential" (one-step update from a scratchpad) or "inconclusive"
    strength: str                   # "strong", "moderate", "weak"
    state_first_layer: int | None
    parity_first_layer: int | None
    early_parity_acc: float         # parity probe accuracy at layer 1 (first block output)
    early_state_acc: float
    boundary_same: list[int | None]
    boundary_diff: list[int | None]
    reason: str


def signature(state_acc: torch.Tensor, parity_acc: torch.Tensor, boundary_same: list, boundary_diff: list,
              parity_chance: float = 0.5) -> Signature:
    """AA vs PAA from per-layer probe accuracies (layer 0 = embeddings) and prefix-patching boundaries."""
    s_first, p_first = first_decodable_layer(state_acc), first_decodable_layer(parity_acc)
    early_p, early_s = float(parity_acc[1]), float(state_acc[1])
    if s_first is None:
        verdict, strength = "inconclusive", "weak"
        reason = f"no layer decodes the state at >= {DECODABLE:.0%}; the model may not track state"
    elif s_first <= 1:
        verdict, strength = "sequential", "strong" if early_s >= 0.99 else "moderate"
        reason = (f"the state is decodable after one layer at every position ({early_s:.2f}): each step updates "
                  f"the previous state written in the input (a scratchpad), no scan over the prefix")
    elif p_first is not None and p_first < s_first:
        gap = s_first - p_first
        verdict = "PAA"
        strength = "strong" if gap >= 2 or early_p - early_s >= 0.3 else "moderate"
        reason = (f"parity is decodable from layer {p_first} but the state only from layer {s_first} "
                  f"(layer-1 accuracy: parity {early_p:.2f} vs state {early_s:.2f})")
    else:
        verdict = "AA"
        lead = early_p - parity_chance
        strength = "strong" if lead < 0.15 else "moderate" if lead < 0.3 else "weak"
        reason = (f"state and parity become decodable together (layer {s_first}); layer-1 parity accuracy "
                  f"{early_p:.2f} is {lead:+.2f} over chance")
    grows = [b for b in boundary_same if b is not None]
    if len(grows) >= 2:
        reason += f"; same-parity prefix boundary by layer: {boundary_same}"
    return Signature(verdict, strength, s_first, p_first, early_p, early_s, boundary_same, boundary_diff, reason)


@dataclass
class SignatureRun:
    """The evidence behind a signature: per-layer probes, the two prefix-patching sweeps, their boundaries."""

    signature: Signature
    probes: object                          # analyses.probing.ProbeResult (state, parity)
    sweeps: dict                            # "same" / "diff" -> analyses.patching.PatchResult
    boundaries: dict                        # "same" / "diff" -> prefix_boundary(...)


def measure_signature(lm, n: int, length: int, *, scratchpad: bool = False, n_probe: int = 400,
                      n_pairs: int = 64, probe_seed: int = 777, pair_seeds: tuple[int, int] = (99, 98)) -> SignatureRun:
    """Probe state and parity at every action position and layer (held-out stories), patch same- and
    other-parity first actions over growing prefixes (resid_post, original <- altered), and read the
    signature. ``scratchpad`` models see their true states interleaved (the format they were trained on)."""
    from analyses.patching import PatchConfig, run_patching
    from analyses.probing import ProbeConfig, probe_layers
    from tasks.permutations import parity_pairs, sample_stories, story_tokens, symmetric_group

    st = sample_stories(n_probe, length, n, seed=probe_seed)
    ids, _, first, last = story_tokens(st.actions, lm.tokenizer, n, scratchpad)
    cols = torch.arange(first, last + 1, 1 + int(scratchpad))          # the action columns
    labels = {}
    for name, values in (("state", st.states), ("parity", symmetric_group(n).parity[st.states])):
        lab = torch.full(ids.shape, -1, dtype=torch.long)
        lab[:, cols] = values
        labels[name] = lab
    probes = probe_layers(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels,
                          positions="all", cfg=ProbeConfig(seed=0))
    sweeps, boundaries = {}, {}
    for kind, seed in zip(("same", "diff"), pair_seeds):
        pairs = parity_pairs(lm.tokenizer, n_pairs, length, n, seed=seed, parity=kind, scratchpad=scratchpad)
        sweeps[kind] = run_patching(lm, pairs, PatchConfig(site="resid_post", region="prefix", direction="noise"))
        boundaries[kind] = prefix_boundary(sweeps[kind].effect(), sweeps[kind].cells)
    i_state, i_parity = probes.targets.index("state"), probes.targets.index("parity")
    sig = signature(probes.test_acc[i_state], probes.test_acc[i_parity], boundaries["same"], boundaries["diff"])
    return SignatureRun(sig, probes, sweeps, boundaries)


# --------------------------------------------------------------------------------------------------
# `interpkit eval`: length generalisation, layer skipping, random baseline, lengthwise probe
# --------------------------------------------------------------------------------------------------
def parse_lengths(text: str) -> list[int]:
    """"start:end[:step]" (end inclusive) or "4,8,16" -> sorted lengths >= 1."""
    from interpkit.errors import UserError

    try:
        if ":" in text:
            parts = [int(x) for x in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            lengths = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        else:
            lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad --lengthwise {text!r}; use start:end[:step] (e.g. 2:16:2) or a list 4,8,16") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"bad --lengthwise {text!r}: lengths must be >= 1 and the range non-empty")
    return sorted(set(lengths))


def story_prompts(tokenizer, group: int = 3, scratchpad: bool = False):
    """``make_prompts(length, n, seed)`` for ``analyses.probing.lengthwise_probe``: random stories of S_group
    (with their true states interleaved for scratchpad models) with final-state and final-parity labels."""
    from tasks.permutations import sample_stories, story_tokens, symmetric_group

    def make(length: int, n: int, seed: int):
        st = sample_stories(n, length, group, seed=seed)
        ids = story_tokens(st.actions, tokenizer, group, scratchpad)[0]
        return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                {"state": st.states[:, -1], "parity": symmetric_group(group).parity[st.states[:, -1]]})
    return make


def eval_command(model: str, *, factor: int = 2, train_len: int | None = None, n: int = 3, stories: int = 1000,
                 seed: int = 12345, out: str = "artifacts/eval", dtype: str = "float32",
                 skip_layers: list[int] | None = None, random_baseline: bool = False, lengthwise: str | None = None,
                 probe_stories: int = 300, signature: bool = False, echo=print) -> dict:
    """``interpkit eval``: state/parity accuracy per position up to ``factor`` x the training length
    (optionally in bfloat16, with layers skipped, or on a random-weight copy), and the lengthwise probe
    (final-position state/parity probes per layer and length). Writes eval.json and plots to ``out``."""
    import json
    from pathlib import Path

    from interpkit.errors import UserError
    from interpkit.models import load_model
    from interpkit.training import evaluate_length_generalization, plot_accuracy

    checks = [(dtype in ("float32", "bfloat16"), f"--dtype {dtype!r}; use float32 or bfloat16"),
              (factor >= 1, "--factor must be >= 1"), (stories >= 1, "--stories must be >= 1"),
              (probe_stories >= 10, "--probe-stories must be >= 10")]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"bad eval option: {msg}")
    lengths = parse_lengths(lengthwise) if lengthwise else None
    recipe = Path(model) / "recipe.json"
    cfg = json.loads(recipe.read_text())["config"] if recipe.exists() else {}
    if train_len is None:
        if not cfg:
            raise UserError(f"{model} has no recipe.json; pass --train-len")
        train_len, n = cfg["train_len"], cfg["n"]
    scratchpad = cfg.get("supervision") == "scratchpad"
    lm = load_model(model, dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    label = model
    if random_baseline:
        from analyses.probing import random_like

        lm, label = random_like(lm, seed=seed), f"{model} (random weights)"
    res = evaluate_length_generalization(lm.hf, lm.tokenizer, n=n, train_len=train_len, factor=factor,
                                         n_stories=stories, seed=seed, skip_layers=skip_layers, scratchpad=scratchpad)
    res.update(model=label, dtype=dtype, skip_layers=skip_layers or [], random_baseline=random_baseline,
               scratchpad=scratchpad)
    Path(out).mkdir(parents=True, exist_ok=True)
    title = label + (f", layers {skip_layers} skipped" if skip_layers else "")
    plot_accuracy(res, Path(out) / "accuracy_vs_length.png", title=title)
    echo(f"state accuracy within training length (min) {res['min_state_acc_in_train_len']:.4f}; "
         f"at {factor}x (last position) {res['state_acc'][-1]:.4f}; beyond (mean) {res['mean_state_acc_beyond']:.4f}; "
         f"cutoff(0.98) state {res['state_cutoff']}, parity {res['parity_cutoff']}")
    if lengths:
        from analyses.probing import ProbeConfig, lengthwise_probe

        lw = lengthwise_probe(lm, story_prompts(lm.tokenizer, n, scratchpad), lengths, n_prompts=probe_stories,
                              cfg=ProbeConfig(seed=seed))
        lw.plot(Path(out) / "lengthwise_probe.png")
        lw.to_dataframe().to_csv(Path(out) / "lengthwise_probe.csv", index=False)
        res["lengthwise"] = {"lengths": lw.lengths, "layers": lw.layers,
                             "state_test_acc": lw.test_acc[0].tolist(), "parity_test_acc": lw.test_acc[1].tolist(),
                             "state_first_layer": lw.first_decodable_layer("state"),
                             "parity_first_layer": lw.first_decodable_layer("parity")}
        echo(lengthwise_table(lw))
    if signature:
        res["signature"] = signature_report(measure_signature(lm, n, train_len, scratchpad=scratchpad), echo)
    (Path(out) / "eval.json").write_text(json.dumps(res, indent=1))
    echo(f"plots and eval.json in {out}/")
    return res


def signature_report(run: SignatureRun, echo=print) -> dict:
    """Print the signature's evidence (probe accuracy by layer, prefix boundaries, verdict); return it as JSON."""
    i_s, i_p = run.probes.targets.index("state"), run.probes.targets.index("parity")
    rows = {"state": [round(float(a), 3) for a in run.probes.test_acc[i_s]],
            "parity": [round(float(a), 3) for a in run.probes.test_acc[i_p]]}
    echo("signature: probe accuracy by layer (0 = embeddings), held-out stories")
    for name, accs in rows.items():
        echo(f"  {name:<7}" + "".join(f"{a:>7.3f}" for a in accs))
    sig = run.signature
    echo(f"  prefix boundary by layer: same parity {run.boundaries['same']}, other parity {run.boundaries['diff']}")
    echo(f"  verdict: {sig.verdict} ({sig.strength}): {sig.reason}")
    return {"state_probe": rows["state"], "parity_probe": rows["parity"], "boundary_same": run.boundaries["same"],
            "boundary_diff": run.boundaries["diff"], "verdict": sig.verdict, "strength": sig.strength, "reason": sig.reason}


def lengthwise_table(lw) -> str:
    """Final-position state probe accuracy, layer x length, plus the first layer reaching 0.9."""
    i = lw.targets.index("state")
    lines = ["lengthwise probe, final-position state accuracy (rows: layer, 0 = embeddings)",
             "length " + "".join(f"{x:>6}" for x in lw.lengths)]
    for j, layer in enumerate(lw.layers):
        lines.append(f"{layer:>6} " + "".join(f"{float(lw.test_acc[i, j, k]):>6.2f}" for k in range(len(lw.lengths))))
    first = ["-" if f is None else str(f) for f in lw.first_decodable_layer("state")]
    lines.append("first  " + "".join(f"{x:>6}" for x in first) + "   (first layer with state accuracy >= 0.9)")
    return "\n".join(lines)
