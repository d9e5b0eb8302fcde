"""Patching-sweep speed on the state-tracking task, measured side by side in one run.

    python bench/bench_state_patching.py [--model artifacts/models/s3-demo] [--pairs 32] [--repeats 3]

Compares one full resid_post (layer x position) prefix-patching sweep of interpkit's batched engine with
(a) the limit: the same number of plain batched HF forwards (one per patched run, no patching), and
(b) one nnsight trace per (layer, position) cell, two invokes (altered then original) with the pairs
batched — the seed's structure, which even loops over pairs (so this baseline is the generous one).
Prints min-of-repeats times and the ratios (targets: <= 1.5x the limit, >= 10x faster than per-cell).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from interpkit.analyses.patching.sweep import PatchConfig, run_patching
from interpkit.tasks.permutations import parity_pairs
from interpkit.models import load_model
from interpkit.sites import site

SHIPPED = Path(__file__).resolve().parent.parent / "artifacts" / "models" / "s3-demo"


def per_cell(lm, pairs, layers, T):
    """One trace per cell: prefix 0..t of the altered run written into the original run."""
    base, src = pairs.batch(), pairs.batch(corrupted=True)
    out = torch.empty(len(layers), T, len(pairs))
    for li, layer in enumerate(layers):
        for t in range(T):
            with lm.model.trace() as tracer:
                with tracer.invoke(src):
                    h_src = site(lm.model, "resid_post", layer)[:, : t + 1].clone()
                with tracer.invoke(base):
                    h = site(lm.model, "resid_post", layer)
                    h[:, : t + 1] = h_src
                    logits = lm.model.output.logits[:, -1].save()
            out[li, t] = (logits.gather(-1, pairs.answer_ids) - logits.gather(-1, pairs.wrong_ids))[:, 0]
    return out


def limit(lm, pairs, n_rows: int, max_rows: int):
    """The same number of rows through plain batched forwards (what any patching sweep must compute)."""
    ids = pairs.input_ids.repeat((n_rows + len(pairs) - 1) // len(pairs), 1)[:n_rows]
    for start in range(0, n_rows, max_rows):
        lm.hf(input_ids=ids[start:start + max_rows], logits_to_keep=1).logits[:, -1]


def main(model: str, n_pairs: int, repeats: int, max_rows: int) -> None:
    torch.set_num_threads(2)
    lm = load_model(model)
    T = 16 if not (Path(model) / "recipe.json").exists() else __import__("json").loads(
        (Path(model) / "recipe.json").read_text())["config"]["train_len"]
    pairs = parity_pairs(lm.tokenizer, n_pairs, T, 3, seed=0, parity="diff")
    layers = list(range(lm.arch.n_layers))
    cfg = PatchConfig(site="resid_post", region="prefix", direction="noise", max_rows=max_rows)
    n_rows = n_pairs * len(layers) * T
    times = {"interpkit batched sweep": [], "limit (plain batched forwards)": [], "per-cell traces": []}
    with torch.no_grad():
        res = run_patching(lm, pairs, cfg)                         # warm-up + reference values
        ref = per_cell(lm, pairs, layers, T)
        diff = (res.values.permute(1, 2, 0) - ref).abs().max().item()
        for _ in range(repeats):
            t = time.perf_counter(); run_patching(lm, pairs, cfg); times["interpkit batched sweep"].append(time.perf_counter() - t)
            t = time.perf_counter(); limit(lm, pairs, n_rows, max_rows); times["limit (plain batched forwards)"].append(time.perf_counter() - t)
            t = time.perf_counter(); per_cell(lm, pairs, layers, T); times["per-cell traces"].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"model {model}: {len(layers)} layers x {T} positions x {n_pairs} pairs = {n_rows} patched runs")
    for k, v in best.items():
        print(f"  {k:<32} {v:8.3f} s")
    ours = best["interpkit batched sweep"]
    print(f"  ratio sweep / limit            {ours / best['limit (plain batched forwards)']:6.2f}x  (target <= 1.5x)")
    print(f"  speed-up vs per-cell traces    {best['per-cell traces'] / ours:6.1f}x  (target >= 10x)")
    print(f"  max |batched - per-cell| logit diff: {diff:.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHIPPED) if SHIPPED.exists() else "tiny:gpt2")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=4096)
    a = ap.parse_args()
    main(a.model, a.pairs, a.repeats, a.max_rows)
