"""Bodies of ``interpkit cache``, ``logit-lens``, ``dla``, ``attention`` and ``steer``: plain Python that
cli.py calls, so they are tested without Typer. Each loads the model (``--dtype``, ``--device``,
``--remote``), builds prompts (``--task``, ``--dataset`` or ``--prompt``), runs one trace or session (one
NDIF request remotely), prints a table and stores arrays and figures under ``<out>/<analysis>/<run-id>/``
with ``interpkit.store.RunStore``."""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from interpkit.analyses.tools.common import encode, parse_dtype, token_labels
from interpkit.errors import UserError


# -- shared ------------------------------------------------------------------------------------------------
def load(model: str, remote: bool | str = False, dtype: str | None = None, device: str | None = None):
    """``load_model`` with ``--dtype`` / ``--device`` applied to every kind of model (tiny ones included)."""
    from interpkit.load_options import apply
    from interpkit.models import load_model

    torch_dtype = parse_dtype(dtype)
    lm = load_model(model, remote=remote, dtype=torch_dtype, device=device)
    if lm.remote is not True:                      # remote=True: the weights live on NDIF
        apply(lm.hf, torch_dtype, device)
    return lm


def build_prompts(lm, task: str | None = None, dataset: str | None = None, prompts: list[str] | None = None,
                  n: int | None = 16, seed: int = 0, echo=print, **kw):
    """A PromptSet from ``--dataset`` or ``--task``, or the raw ``--prompt`` strings."""
    given = [x for x in (task, dataset, prompts) if x]
    if len(given) != 1:
        raise UserError("pass exactly one of --task, --dataset or --prompt")
    if dataset:
        from interpkit.tasks.custom import load_dataset

        return load_dataset(dataset, lm.tokenizer, n=n, seed=seed, echo=echo, **kw)
    if task:
        from interpkit.tasks import get_task

        return get_task(task)(lm.tokenizer, n=n, seed=seed)
    return list(prompts)


def load_with_prompts(model: str, remote, dtype, device, task, dataset, prompts, n, seed, echo):
    """(model, prompts): ``load`` then ``build_prompts``, the start of every prompt-based tool."""
    lm = load(model, remote, dtype, device)
    return lm, build_prompts(lm, task, dataset, prompts, n=n, seed=seed, echo=echo)


def timed(fn, *args, **kw):
    """(``fn(*args, **kw)``, its wall-clock seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def open_store(analysis: str, config: dict, model: str, lm, seed: int | None, out: str, run_id: str | None):
    from interpkit.store import RunStore

    return RunStore(analysis, config, model=model, revision=lm.revision, seed=seed, root=out, run_id=run_id,
                    remote=lm.remote or False)


def store_arrays(store, arrays: dict, seconds: float) -> None:
    """The run's arrays as chunk ``result`` (a rerun of the same config finds them stored already)."""
    if not store.has_chunk("result"):
        store.write_chunk("result", {k: np.asarray(v) for k, v in arrays.items()}, seconds=seconds)


def echo_outputs(store, figures: list[str], echo) -> None:
    """The closing lines of a command: where its run went and each figure it wrote."""
    echo(f"results: {store.dir}")
    for f in figures:
        echo(f"figure:  {f}")


# -- cache -------------------------------------------------------------------------------------------------
def cache_command(model: str, sites: str = "resid_pre", layers: list[int] | None = None, task: str | None = None,
                  dataset: str | None = None, prompts: list[str] | None = None, n: int = 8, seed: int = 0,
                  remote: bool | str = False, dtype: str | None = None, device: str | None = None,
                  max_gb: float = 4.0, out: str = "artifacts", run_id: str | None = None, echo=print) -> dict:
    """``interpkit cache``: activations of the chosen sites to ``<run>/cache.h5`` (one trace)."""
    from interpkit.analyses.tools.cache import cache, parse_sites

    names = parse_sites(sites)
    lm, ps = load_with_prompts(model, remote, dtype, device, task, dataset, prompts, n, seed, echo)
    acts, seconds = timed(cache, lm, ps, sites=names, layers=layers, max_bytes=max_gb * 2 ** 30, echo=echo)
    cfg = {"sites": names, "layers": layers, "task": task, "dataset": dataset, "prompts": prompts, "n": n,
           "dtype": dtype}
    with open_store("cache", cfg, model, lm, seed, out, run_id) as store:
        path = acts.to_hdf5(store.dir / "cache.h5")
        store.time("trace", seconds)
        store.finish(cache="cache.h5", sites=names, n_prompts=int(acts.input_ids.shape[0]), bytes=acts.nbytes())
    for (site, layer), t in list(acts.acts.items())[:12]:
        echo(f"  {site:<10} layer {layer:>3}  {tuple(t.shape)}  ({', '.join(acts.dims[site])})")
    if len(acts) > 12:
        echo(f"  ... {len(acts) - 12} more")
    echo(f"cache: {path} ({len(acts)} tensors, {acts.nbytes() / 2 ** 20:.1f} MiB, {seconds:.2f} s)")
    return {"path": path, "run_dir": str(store.dir), "tensors": len(acts)}


# -- logit lens --------------------------------------------------------------------------------------------
def logit_lens_command(model: str, task: str | None = None, dataset: str | None = None,
                       prompts: list[str] | None = None, n: int = 16, seed: int = 0, top_k: int = 5,
                       remote: bool | str = False, dtype: str | None = None, device: str | None = None,
                       out: str = "artifacts", run_id: str | None = None, echo=print) -> dict:
    """``interpkit logit-lens``: per layer, top-k tokens; answer probability, rank and logit difference."""
    from interpkit.analyses.tools.logit_lens import logit_lens, plot_answer, plot_lens

    lm, ps = load_with_prompts(model, remote, dtype, device, task, dataset, prompts, n, seed, echo)
    res, seconds = timed(logit_lens, lm, ps, k=top_k)
    cfg = {"task": task, "dataset": dataset, "prompts": prompts, "n": n, "top_k": top_k, "dtype": dtype}
    with open_store("logit_lens", cfg, model, lm, seed, out, run_id) as store:
        store_arrays(store, {"top_ids": res.top_ids, "top_probs": res.top_probs, "answer_prob": res.answer_prob,
                             "answer_rank": res.answer_rank, "logit_diff": res.logit_diff,
                             "input_ids": res.input_ids, "attention_mask": res.attention_mask}, seconds)
        figures = [plot_lens(res, lm, store.dir / "logit_lens.png")]
        if not torch.isnan(res.answer_prob).all():
            figures.append(plot_answer(res, store.dir / "logit_lens_answer.png"))
        summary = res.summary()
        store.note(figures=figures)
        store.finish(rows=summary)
    keep = res.attention_mask[0].bool()
    echo(f"logit lens of {len(ps)} prompt(s) on {model}; prompt 0: {lm.tokenizer.decode(res.input_ids[0][keep])!r}")
    has_answer = not torch.isnan(res.answer_prob).all()
    head = f"  {'row':<6} {'top-' + str(top_k) + ' at the last position (prompt 0)':<58}"
    echo(head + (f" {'p(answer)':>9} {'rank':>6} {'logit diff':>10}" if has_answer else ""))
    for i, row in enumerate(summary):
        tops = " ".join(f"{lm.tokenizer.decode([int(t)])!r}:{float(p):.2f}"
                        for t, p in zip(res.top_ids[i, 0, -1], res.top_probs[i, 0, -1]))
        line = f"  {row['row']:<6} {tops[:58]:<58}"
        if has_answer:
            line += f" {row['answer_prob']:>9.4f} {row['answer_rank_median']:>6.0f} {row['logit_diff']:>10.3f}"
        echo(line)
    echo_outputs(store, figures, echo)
    return {"run_dir": str(store.dir), "rows": summary, "figures": figures}


# -- DLA ---------------------------------------------------------------------------------------------------
def dla_command(model: str, task: str | None = None, dataset: str | None = None, n: int = 16, seed: int = 0,
                top: int = 10, by_source: bool = False, remote: bool | str = False, dtype: str | None = None,
                device: str | None = None, out: str = "artifacts", run_id: str | None = None, echo=print) -> dict:
    """``interpkit dla``: the logit difference split into embedding, heads, MLPs (final-norm scale frozen)."""
    from interpkit.analyses.tools.dla import dla, plot_dla

    lm, ps = load_with_prompts(model, remote, dtype, device, task, dataset, None, n, seed, echo)
    res, seconds = timed(dla, lm, ps, by_source=by_source)
    cfg = {"task": task, "dataset": dataset, "n": n, "by_source": by_source, "dtype": dtype}
    err = res.max_error()
    ranked = res.ranked(top)
    with open_store("dla", cfg, model, lm, seed, out, run_id) as store:
        arrays = {"embed": res.embed, "heads": res.heads, "attn_bias": res.attn_bias, "mlp": res.mlp,
                  "const": res.const, "logit_diff": res.logit_diff}
        if res.by_source is not None:
            arrays["by_source"] = res.by_source
        store_arrays(store, arrays, seconds)
        figures = [plot_dla(res, store.dir / "dla.png")]
        store.note(figures=figures, convention="final-norm scale frozen at the run's value; pre-softcap logits")
        store.finish(top=ranked, max_sum_error=err, logit_diff=float(res.logit_diff.mean()))
    echo(f"DLA of {len(ps)} prompt(s) on {model}: logit diff {float(res.logit_diff.mean()):.4f} (mean); "
         f"parts sum to it within {err:.2e} (final-norm scale frozen)")
    echo(f"  {'part':<14} {'mean contribution':>18}")
    for row in ranked:
        echo(f"  {row['part']:<14} {row['contribution']:>18.4f}")
    if res.by_source is not None:
        echo("top heads by source position (prompt-mean, padded coordinates):")
        src = res.by_source.mean(0)                                            # [L, H, T]
        for row in [r for r in ranked if r["part"].startswith("L") and "H" in r["part"]][:3]:
            l, h = (int(x) for x in row["part"][1:].split("H"))
            vals, pos = src[l, h].abs().topk(min(3, src.shape[-1]))
            labels = token_labels(lm, ps.input_ids[0])
            echo(f"  {row['part']}: " + ", ".join(f"{int(p)} {labels[int(p)]!r} {float(src[l, h, p]):+.3f}"
                                                 for p in pos))
    echo_outputs(store, figures, echo)
    return {"run_dir": str(store.dir), "top": ranked, "max_error": err, "figures": figures}


# -- attention ---------------------------------------------------------------------------------------------
def _role_pairs(text: str | None) -> list[tuple[str, str]]:
    """"end:IO,S2:S1" -> [("end", "IO"), ("S2", "S1")]."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        if ":" not in item:
            raise UserError(f"bad --roles item {item!r}; write dest:src pairs such as end:IO,S2:S1")
        d, s = item.split(":", 1)
        pairs.append((d.strip(), s.strip()))
    return pairs


def attention_command(model: str, task: str | None = None, dataset: str | None = None,
                      prompts: list[str] | None = None, n: int = 16, seed: int = 0, roles: str | None = None,
                      dest: str | None = None, show: int = 0, layers: list[int] | None = None,
                      detect: bool = False, n_tokens: int = 20, threshold: float = 0.4,
                      remote: bool | str = False, dtype: str | None = None, device: str | None = None,
                      out: str = "artifacts", run_id: str | None = None, echo=print) -> dict:
    """``interpkit attention``: patterns of prompt ``show``; role -> role attention (``--roles end:IO``);
    where ``--dest`` attends on average; previous-token / duplicate / induction head detectors."""
    from interpkit.analyses.tools import attention as A
    from interpkit.analyses.tools.cache import cache_call
    from interpkit.analyses.tools.common import run_traces

    lm = load(model, remote, dtype, device)
    ps = None
    if task or dataset or prompts:
        ps = build_prompts(lm, task, dataset, prompts, n=n, seed=seed, echo=echo)
    elif not detect:
        raise UserError("pass --task, --dataset or --prompt (patterns, roles) and/or --detect (head detectors)")
    cfg = {"task": task, "dataset": dataset, "prompts": prompts, "n": n, "roles": roles, "dest": dest,
           "show": show, "layers": layers, "detect": detect, "n_tokens": n_tokens, "threshold": threshold,
           "dtype": dtype}
    # every part is one trace; all of them run as one batch (remotely: one session = one NDIF request)
    parts = []
    if ps is not None:
        if not 0 <= show < len(ps):
            raise UserError(f"--show {show} is out of range; there are {len(ps)} prompts (0..{len(ps) - 1})")
        one = ps.subset([show]) if hasattr(ps, "subset") else [ps[show]]
        parts.append(("patterns", None, cache_call(lm, one, sites=["pattern"], layers=layers)))
        for d, s_ in _role_pairs(roles):
            parts.append(("role", (d, s_), A.role_attention_call(lm, ps, d, s_, layers)))
        if dest:
            parts.append(("profile", dest, A.dest_profile_call(lm, ps, dest, layers)))
    if detect:
        parts.append(("detect", None, A.detect_heads_call(lm, n_tokens=n_tokens, seed=seed, threshold=threshold,
                                                          layers=layers)))
    outs, seconds = timed(run_traces, lm, [call for _, _, (call, _) in parts])
    results = [(kind, key, finish(out)) for (kind, key, (_, finish)), out in zip(parts, outs)]
    summary, figures, arrays = {}, [], {}
    with open_store("attention", cfg, model, lm, seed, out, run_id) as store:
        for kind, key, res in results:
            if kind == "patterns":
                keep = res.attention_mask[0].bool()
                tokens = [t for t, k in zip(res.tokens[0], keep.tolist()) if k]
                for layer in sorted({l for _, l in res.keys()})[:4]:
                    Am = res["pattern", layer][0][:, keep][:, :, keep]
                    figures.append(A.plot_patterns(Am, tokens, layer, store.dir / f"patterns_L{layer}.png"))
                    arrays[f"pattern_L{layer}"] = res["pattern", layer][0]
            elif kind == "role":
                d, s_ = key
                summary[f"{d}->{s_}"] = res.top(10)
                arrays[f"role_{d}_to_{s_}"] = res.per_prompt
                figures.append(A.plot_heads(res.mean, res.layers, store.dir / f"role_{d}_to_{s_}.png",
                                            f"attention {d}->{s_} (mean over {len(ps)} prompts)", "attention"))
            elif kind == "profile":
                by_layer = res.by_layer()
                arrays[f"profile_{key}"] = res.per_prompt
                ids = ps.input_ids[0] if hasattr(ps, "input_ids") else encode_ids(lm, ps)
                labels = [f"{p} {t!r}" for p, t in enumerate(token_labels(lm, ids))]
                figures.append(A.plot_profile(by_layer, res.layers, labels, store.dir / f"profile_{key}.png",
                                              f"attention from {key} (mean over heads and prompts)"))
                summary[f"from {key}"] = [{"layer": l, "top_positions": [
                    {"pos": int(p), "attention": round(float(by_layer[i, p]), 4)}
                    for p in by_layer[i].topk(min(3, by_layer.shape[1])).indices]} for i, l in enumerate(res.layers)]
            else:
                arrays["detector_scores"] = res.scores
                H = res.scores.shape[2]
                for i, det in enumerate(A.DETECTORS):
                    figures.append(A.plot_heads(res.scores[i], res.layers, store.dir / f"detect_{det}.png",
                                                f"{det.replace('_', '-')} score", "score", vmax=1.0))
                    top = res.scores[i].flatten().topk(min(3, res.scores[i].numel()))
                    summary[det] = {"detected": res.detected(det),
                                    "best": [{"layer": res.layers[int(j) // H], "head": int(j) % H,
                                              "score": round(float(v), 4)} for v, j in zip(*top)]}
        store_arrays(store, arrays, seconds)
        store.note(figures=figures)
        store.finish(**{k.replace("->", "_to_"): v for k, v in summary.items()})
    _print_attention(summary, echo)
    echo_outputs(store, figures, echo)
    return {"run_dir": str(store.dir), "summary": summary, "figures": figures}


def encode_ids(lm, prompts) -> torch.Tensor:
    return encode(lm, prompts)["input_ids"][0]


def _print_attention(summary: dict, echo) -> None:
    for key, rows in summary.items():
        if "->" in key:
            echo(f"attention {key}, top heads (mean over prompts):")
            echo("  " + ", ".join(f"L{r['layer']}H{r['head']} {r['attention']:.3f}" for r in rows))
        elif key.startswith("from "):
            echo(f"attention {key}, per layer the most attended positions (mean over heads):")
            for r in rows:
                echo(f"  layer {r['layer']:>2}: " + ", ".join(f"pos {p['pos']} {p['attention']:.3f}"
                                                           for p in r["top_positions"]))
        else:
            det = rows["detected"]
            echo(f"{key.replace('_', '-')} heads (score > threshold): "
                 f"{', '.join(f'L{l}H{h}' for l, h in det) or 'none'}; best "
                 + ", ".join(f"L{r['layer']}H{r['head']} {r['score']:.3f}" for r in rows["best"]))


# -- steering ----------------------------------------------------------------------------------------------
def _lines(values: list[str] | None, file: str | None, what: str) -> list[str]:
    out = list(values or [])
    if file:
        try:
            out += [line.rstrip("\n") for line in open(file, encoding="utf-8") if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read {what} file {file}: {e.strerror}") from None
    return out


def steer_command(model: str, layer: int, positive: list[str] | None = None, negative: list[str] | None = None,
                  positive_file: str | None = None, negative_file: str | None = None,
                  prompts: list[str] | None = None, coefficients: list[float] | None = None,
                  max_new_tokens: int = 12, pos_word: str | None = None, neg_word: str | None = None,
                  remote: bool | str = False, dtype: str | None = None, device: str | None = None,
                  out: str = "artifacts", run_id: str | None = None, echo=print) -> dict:
    """``interpkit steer``: CAA vector, generations side by side with the unsteered text, coefficient sweep."""
    from interpkit.analyses.tools.steering import steer

    pos = _lines(positive, positive_file, "positive prompts")
    neg = _lines(negative, negative_file, "negative prompts")
    coefficients = list(coefficients) if coefficients else [0.0, 4.0, 8.0]
    lm = load(model, remote, dtype, device)
    res, seconds = timed(steer, lm, pos, neg, list(prompts or []), layer, coefficients, max_new_tokens, pos_word,
                         neg_word)
    cfg = {"layer": layer, "positive": pos, "negative": neg, "prompts": prompts, "coefficients": coefficients,
           "max_new_tokens": max_new_tokens, "pos_word": pos_word, "neg_word": neg_word, "dtype": dtype}
    with open_store("steering", cfg, model, lm, None, out, run_id) as store:
        store_arrays(store, {"unsteered_ids": res.unsteered_ids,
                             "steered_ids": torch.stack([torch.as_tensor(g) for g in res.steered_ids]),
                             "word_logp_diff": torch.tensor(res.word_logp_diff), "kl": torch.tensor(res.kl)}, seconds)
        texts = {"prompts": res.prompts, "unsteered": res.unsteered,
                 "steered": {str(c): t for c, t in zip(res.coefficients, res.steered)}}
        (store.dir / "generations.json").write_text(json.dumps(texts, indent=1))
        sweep = [{"coefficient": c, "word_logp_diff": round(w, 4), "kl": round(k, 5)}
                 for c, w, k in zip(res.coefficients, res.word_logp_diff, res.kl)]
        store.finish(sweep=sweep, vector_norm=res.vector_norm)
    echo(f"steering vector at layer {res.layer}: mean difference of {len(pos)} vs {len(neg)} prompts, "
         f"norm {res.vector_norm:.3f}")
    for i, p in enumerate(res.prompts):
        echo(f"prompt {p!r}")
        echo(f"  {'unsteered':>12}: {res.unsteered[i]!r}")
        for c, texts_c in zip(res.coefficients, res.steered):
            echo(f"  {'coef ' + format(c, 'g'):>12}: {texts_c[i]!r}")
    metric = f"log p({pos_word!r}) - log p({neg_word!r})" if pos_word else "(no --pos-word/--neg-word)"
    echo(f"sweep: {'coef':>6} {metric:>34} {'KL to unsteered':>16}")
    for row in sweep:
        echo(f"       {row['coefficient']:>6g} {row['word_logp_diff']:>34.4f} {row['kl']:>16.5f}")
    echo(f"results: {store.dir}")
    return {"run_dir": str(store.dir), "sweep": sweep, "unsteered": res.unsteered, "steered": res.steered}
