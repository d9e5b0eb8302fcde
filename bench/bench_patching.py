"""Activation-patching sweep (resid_pre x position) on a GPT-2-small-sized random model, timed side by side.

    python bench/bench_patching.py [--pairs 4] [--tokens 12] [--threads 1] [--repeats 2] [--no-tl]

Model: GPT2Config(n_layer=12, n_embd=768, n_head=12) with random weights (seed 0), built locally.
Prompts: random token ids, no padding; the corrupted prompt differs at two positions. Metric: logit
difference at the last position. Rows, in the order they are timed (interleaved per repeat):

- engine:  ``analyses.patching.sweep.run_patching`` with ``engine="full"`` (the plain reference engine: every cell
           is a row of full forwards, ``--max-rows`` per forward)
- attribution: ``analyses.patching.attribution.run_attribution`` (one forward + backward; agreement printed)
- limit:   the same number of plain HF forwards over the same batches (no nnsight, no patching), with
           the same last-position-only logits; and, for reference, the same forwards with full logits
- TL:      TransformerLens ``patching.get_act_patch_resid_pre`` (one forward per cell) on a
           HookedTransformer holding identical weights (converted from the HF state dict offline), plus
           its ``run_with_cache`` of the clean run
- prefix:  ``analyses.patching.sweep.run_patching`` with the default engine (provably-zero cells skipped, the
           rest on the base run's key/value cache; ``interpkit/engine``)

Every method's [layer, position] mean metric must agree with the engine's to 1e-4 (checked, printed).
Times are the min over ``--repeats``; ratios are to the engine unless stated.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from interpkit.analyses.patching.attribution import agreement, run_attribution
from interpkit.analyses.patching.sweep import PatchConfig, plan_chunks, run_patching
from interpkit import metrics as M


def build(seed: int = 0):
    """(LoadedModel, HF model) of a random GPT-2-small-sized model with a throwaway word tokenizer."""
    from nnsight import TransformersModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from interpkit.arch import Arch
    from interpkit.families import FAMILIES
    from interpkit.models import LoadedModel

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    t = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", padding_side="left")
    fam = FAMILIES["gpt2"]
    return LoadedModel("random-gpt2-small", TransformersModel(hf, tokenizer=tok, rename=fam.rename),
                       Arch.from_hf(hf, fam), tok), hf


def prompt_pairs(n_pairs: int, n_tokens: int, vocab: int, seed: int = 0):
    from interpkit.tasks.base import PromptSet

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (n_pairs, n_tokens), generator=g)
    bad = ids.clone()
    for p in (1, n_tokens // 2):
        bad[:, p] = torch.randint(100, vocab, (n_pairs,), generator=g)
    mask = torch.ones_like(ids)
    return PromptSet(task="bench", prompts=[""] * n_pairs, input_ids=ids, attention_mask=mask,
                     answer_ids=torch.randint(100, vocab, (n_pairs, 1), generator=g),
                     wrong_ids=torch.randint(100, vocab, (n_pairs, 1), generator=g),
                     corrupted_prompts=[""] * n_pairs, corrupted_ids=bad, corrupted_mask=mask.clone())


def hooked_transformer(hf):
    """A TransformerLens HookedTransformer with exactly hf's weights (no folding or centring)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head,
                                  d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size,
                                  act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
                                  positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
                                  default_prepend_bos=False)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def run_tl(tl, prompts):
    from transformer_lens import patching

    answer, wrong = prompts.answer_ids, prompts.wrong_ids

    def metric(logits):
        return M.logit_diff(logits[:, -1], answer, wrong).mean()

    _, cache = tl.run_with_cache(prompts.input_ids)
    return patching.get_act_patch_resid_pre(tl, prompts.corrupted_ids, cache, metric)      # [layers, pos]


def limit_fn(hf, lm, prompts, cfg: PatchConfig, last_only: bool):
    """The plain HF forwards the engine's sweep amounts to: same batch shapes, no nnsight."""
    P, T = prompts.input_ids.shape
    chunks = plan_chunks(cfg, P, list(range(lm.arch.n_layers)), list(range(T)), T, lm.arch.n_heads)
    batches = [torch.cat([prompts.input_ids] * (len(c.cells) + 2)) for c in chunks]
    kw = {"logits_to_keep": 1} if last_only else {}

    def run():
        for ids in batches:
            hf(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return run, len(batches)


def main(args) -> None:
    torch.set_num_threads(args.threads)
    lm, hf = build()
    prompts = prompt_pairs(args.pairs, args.tokens, hf.config.vocab_size)
    cfg = PatchConfig(site="resid_pre", max_rows=args.max_rows)
    runs, outs = {}, {}
    results = {}

    def engine():
        results["exact"] = run_patching(lm, prompts, replace(cfg, engine="full"))
        return results["exact"].values.mean(0)

    def attribution():
        results["attribution"] = run_attribution(lm, prompts, cfg)

    runs["engine"] = engine
    runs["attribution"] = attribution
    limit, n_forwards = limit_fn(hf, lm, prompts, cfg, last_only=True)
    runs["limit"] = limit
    runs["limit (full logits)"] = limit_fn(hf, lm, prompts, cfg, last_only=False)[0]
    if not args.no_prefix:
        runs["prefix (KV reuse)"] = lambda: run_patching(lm, prompts, cfg).values.mean(0)
    if not args.no_tl:
        try:
            tl = hooked_transformer(hf)
            runs["TransformerLens"] = lambda: run_tl(tl, prompts)
        except ImportError as e:
            print(f"TransformerLens unavailable ({e}); skipped")
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        with torch.no_grad():
            for name, fn in runs.items():
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
                if out is not None:
                    outs[name] = out
    L, T = lm.arch.n_layers, args.tokens
    print(f"resid_pre x position sweep: GPT-2-small-sized random model (12 layers, d_model 768), {args.pairs} pairs x "
          f"{T} tokens = {L * T} cells, {args.threads} thread(s); engine = {n_forwards} batched forwards "
          f"(max_rows {args.max_rows}); min of {args.repeats}")
    ref = outs["engine"]
    eng = min(times["engine"])
    print(f"{'method':<22} {'seconds':>9} {'vs engine':>10} {'vs limit':>9}  max |diff| to engine")
    lim = min(times["limit"])
    for name in runs:
        s = min(times[name])
        diff = f"{(outs[name] - ref).abs().max().item():.2e}" if name in outs else "-"
        print(f"{name:<22} {s:>9.2f} {s / eng:>9.2f}x {s / lim:>8.2f}x  {diff}")
    agree = agreement(results["exact"], results["attribution"], k=10)
    print("attribution vs exact (first-order estimate, same cells): "
          + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in agree.items()))
    for name in outs:
        assert (outs[name] - ref).abs().max().item() < 1e-4, f"{name} disagrees with the engine"
    if "TransformerLens" in times:
        tl_s = min(times["TransformerLens"])
        print(f"speed-up over TransformerLens: engine {tl_s / eng:.1f}x"
              + (f", prefix {tl_s / min(times['prefix (KV reuse)']):.1f}x" if "prefix (KV reuse)" in times else ""))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, text in (("--pairs", 4, "prompt pairs"),
                                ("--tokens", 12, "tokens per prompt (the sweep's positions)"),
                                ("--threads", 1, "torch CPU threads"),
                                ("--repeats", 2, "timed repeats; each row reports its minimum"),
                                ("--max-rows", 512, "rows per forward of the engine")):
        ap.add_argument(flag, type=int, default=default, help=text)
    for flag, row in (("--no-tl", "TransformerLens"), ("--no-prefix", "prefix-engine")):
        ap.add_argument(flag, action="store_true", help=f"skip the {row} row")
    main(ap.parse_args())
