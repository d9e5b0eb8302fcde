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
    probes: object                          # analyses.probing.linear.ProbeResult (state, parity)
    sweeps: dict                            # "same" / "diff" -> analyses.patching.sweep.PatchResult
    boundaries: dict                        # "same" / "diff" -> prefix_boundary(...)


def measure_signature(lm, n: int, length: int, *, scratchpad: bool = False, n_probe: int = 400,
                      n_pairs: int = 64, probe_seed: int = 777, pair_seeds: tuple[int, int] = (99, 98)) -> SignatureRun:
    """Probe state and parity at every action position and layer (held-out stories), patch same- and
    other-parity first actions over growing prefixes (resid_post, original <- altered), and read the
    signature. ``scratchpad`` models see their true states interleaved (the format they were trained on)."""
    from interpkit.analyses.patching.sweep import PatchConfig, run_patching
    from interpkit.analyses.probing.linear import ProbeConfig, probe_layers
    from interpkit.tasks.permutations import (
        parity_pairs,
        sample_stories,
        story_tokens,
        symmetric_group,
    )

    from interpkit.progress import stage

    with stage("signature (probes, same- and other-parity patching)", 3, "steps") as bar:
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
        bar.advance()
        sweeps, boundaries = {}, {}
        for kind, seed in zip(("same", "diff"), pair_seeds):
            pairs = parity_pairs(lm.tokenizer, n_pairs, length, n, seed=seed, parity=kind, scratchpad=scratchpad)
            sweeps[kind] = run_patching(lm, pairs, PatchConfig(site="resid_post", region="prefix", direction="noise"))
            boundaries[kind] = prefix_boundary(sweeps[kind].effect(), sweeps[kind].cells)
            bar.advance()
    i_state, i_parity = probes.targets.index("state"), probes.targets.index("parity")
    sig = signature(probes.test_acc[i_state], probes.test_acc[i_parity], boundaries["same"], boundaries["diff"])
    return SignatureRun(sig, probes, sweeps, boundaries)

