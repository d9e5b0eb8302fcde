"""Attention-causal tracing of one prompt on a GPT-2-small-sized random model: ours vs a loop reference.

    python bench/bench_attention_tracing.py [--prompts 2] [--threads 1] [--ref-edges 25]

Model: GPT2Config(n_layer=12, n_embd=768, n_head=12), random weights (seed 0, std 0.02), untied
unembedding, built locally with the tiny BPE tokenizer. With plain random weights the logit difference
is carried by the embedding and MLPs and no head gets traced, so the weights are rescaled to make heads
matter as in trained models: W_Q and W_K x3 (peakier attention), W_O x8, MLP output x0.1. Prompts: the
IOI task (``tasks.ioi``); prompts whose logit difference is <= 0 are skipped (nothing to trace).

Rows:
- omega:  Omega's SVD for all 144 heads, both sides: factored (QR + d_head x d_head SVD, ``omega.py``)
          vs a dense SVD of every 768 x 769 Omega (what the reference computes per head).
- trace:  ours = one nnsight trace + decomposition + work queue (``trace.trace_prompt``, einsums), for
          the whole prompt; then ours and the loop reference (``reference.trace_prompt_reference``:
          Python loops over upstream heads, source tokens, positions and singular vectors, as the
          reference code does) on the same activations and the same first ``--ref-edges`` queued edges
          (the reference takes minutes per prompt otherwise). Both must give the same graph (checked).
Speed-ups compare the tracing work (activations are one shared forward either way).
"""
from __future__ import annotations

import argparse
import time

import torch


def build(init: float, seed: int = 0, tied: bool = True):
    from nnsight import TransformersModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from interpkit.arch import Arch
    from interpkit.families import FAMILIES
    from interpkit.models import LoadedModel
    from interpkit.tokenizers import build_tokenizer

    tok = build_tokenizer("bpe")
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tok), n_positions=1024, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init, pad_token_id=tok.pad_token_id,
                     tie_word_embeddings=tied)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    fam = FAMILIES["gpt2"]
    return LoadedModel("random-gpt2-small", TransformersModel(hf, tokenizer=tok, rename=fam.rename),
                       Arch.from_hf(hf, fam), tok)


def same_graph(G, R) -> tuple[bool, float]:
    e1 = {(u, v, k): w for u, v, k, w in G.edges(keys=True, data="weight")}
    e2 = {(u, v, k): w for u, v, k, w in R.edges(keys=True, data="weight")}
    if set(e1) != set(e2):
        return False, float("nan")
    return True, max([abs(e1[k] - e2[k]) for k in e1] + [0.0])


def _interventions(lm, omega, pool, records, n: int) -> None:
    """Full signal-subspace removal vs a random equal-size subspace of the same Omega, per edge side."""
    from interpkit.analyses.attention_tracing.interventions import signal_removal

    t = time.perf_counter()
    df = signal_removal(lm, omega, pool, records, max_edges=n)
    for mode, g in df.groupby("mode"):
        print(f"  {mode:>6}: {len(g)} edge sides, mean dA {g.d_attn.mean():+.4f} (median {g.d_attn.median():+.4f}, "
              f"lowered in {100 * (g.d_attn < 0).mean():.0f}%), mean |dA| {g.d_attn.abs().mean():.4f}, "
              f"mean |d logit diff| {g.d_logit_diff.abs().mean():.4f}, "
              f"subspace {g.n_control.mean():.1f}/{g['rank'].iloc[0]}")
    print(f"  ({time.perf_counter() - t:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="IOI prompts traced (those with a positive logit difference)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--ref-edges", type=int, default=25, help="queued edges both ours and the loop reference trace")
    ap.add_argument("--interventions", type=int, default=40,
                    help="edge sides of the first prompt to run full-signal vs random-subspace removal on (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from interpkit.analyses.attention_tracing.decompose import collect, decompose, load_weights, logit_direction
    from interpkit.analyses.attention_tracing.omega import Omega
    from interpkit.analyses.attention_tracing.reference import DenseSVD, trace_prompt_reference
    from interpkit.analyses.attention_tracing.trace import AttnTraceConfig, node_labels, trace_prompt
    from interpkit.tasks import get_task

    lm = build(0.02, tied=False)
    with torch.no_grad():
        for block in lm.hf.transformer.h:
            block.attn.c_attn.weight[:, : 2 * 768] *= 3
            block.attn.c_proj.weight *= 8
            block.mlp.c_proj.weight *= 0.1
    a = lm.arch
    print(f"model: random GPT-2 small config ({a.n_layers} layers, d_model {a.d_model}, {a.n_heads} heads), "
          f"{args.threads} thread(s)")
    t = time.perf_counter()
    omega = Omega(a)
    for side in ("q", "k"):
        omega.core(side, 0)
    t_fact = time.perf_counter() - t
    dense = DenseSVD(omega)
    t = time.perf_counter()
    for layer in range(a.n_layers):
        for head in range(a.n_heads):
            for side in ("q", "k"):
                dense(layer, head, side, 0)
    t_dense = time.perf_counter() - t
    print(f"omega SVD, {a.n_layers * a.n_heads} heads x 2 sides: factored {t_fact:.2f} s, dense {t_dense:.1f} s "
          f"({t_dense / t_fact:.0f}x)")

    weights = load_weights(a)
    pool = get_task("ioi")(lm.tokenizer, n=32, seed=0)
    done = 0
    for i in range(len(pool)):
        if done >= args.prompts:
            break
        one = pool.subset([i])
        t0 = time.perf_counter()
        with torch.no_grad():
            acts = collect(lm, one.batch())
        t_act = time.perf_counter() - t0
        dec = decompose(omega, weights, acts, 0)
        direction, _ = logit_direction(weights, one.answer_ids[0], one.wrong_ids[0])
        tokens = [lm.tokenizer.decode([x]) for x in one.input_ids[0, dec.offset:].tolist()]
        labels = node_labels(one, 0, dec.offset, tokens)
        G, recs, _ = trace_prompt(omega, dec, direction, labels, AttnTraceConfig(require_correct=False), prompt=i)
        t_full = time.perf_counter() - t0
        if G is None:
            continue
        done += 1
        cap = AttnTraceConfig(require_correct=False, max_edges=args.ref_edges)
        t1 = time.perf_counter()
        Gc, recs_c, _ = trace_prompt(omega, dec, direction, labels, cap, prompt=i)
        t_ours = time.perf_counter() - t1
        t1 = time.perf_counter()
        R, _ = trace_prompt_reference(omega, dec, direction, labels, cap, prompt=i, dense_svd=False)
        t_ref = time.perf_counter() - t1
        ok, err = same_graph(Gc, R)
        n_full, n_cap = len(recs) // 2, len(recs_c) // 2
        print(f"prompt {i} ({dec.n} tokens): whole trace {n_full} edges, {G.number_of_edges()} graph edges in "
              f"{t_full:.2f} s (activation trace {t_act:.2f} s)")
        print(f"  first {n_cap} edges: ours {t_ours:.3f} s, reference {t_ref:.1f} s -> {t_ref / t_ours:.0f}x; "
              f"same graph {ok} (max |dw| {err:.1e}); reference for the whole prompt ~ "
              f"{t_ref / max(n_cap, 1) * n_full / 60:.0f} min vs ours {t_full:.1f} s")
        if done == 1 and args.interventions:
            _interventions(lm, omega, pool, recs, args.interventions)


if __name__ == "__main__":
    main()
