"""`interpkit causal-trace`: options and config file, the resumable run store, the summary table."""
from __future__ import annotations

import time

import torch

from interpkit.analyses.causal_tracing.facts import (GROUP_LABELS, subject_mask)
from interpkit.errors import UserError


# --------------------------------------------------------------------------------------------------
# storage and the CLI command body
# --------------------------------------------------------------------------------------------------
from interpkit.analyses.causal_tracing.trace import BASE_KINDS, FactTrace, SEVERED_KINDS, TraceConfig, TraceResult, parse_noise, run_causal_tracing


def chunk_arrays(traces: list[FactTrace], width: int) -> dict:
    """A chunk of FactTraces as arrays for the RunStore (positions right-padded to ``width`` with NaN/-1)."""
    import numpy as np

    F, (K, _, L) = len(traces), traces[0].scores.shape
    scores = np.full((F, K, width, L), np.nan, dtype=np.float32)
    for i, t in enumerate(traces):
        scores[i, :, :len(t.tokens)] = t.scores.numpy()
    as_int = lambda f: np.array([f(t) for t in traces], dtype=np.int64)  # noqa: E731
    return {"scores": scores, "index": as_int(lambda t: t.index), "key": as_int(lambda t: t.key),
            "answer": as_int(lambda t: t.answer_id), "n_tokens": as_int(lambda t: len(t.tokens)),
            "subject": np.array([[t.subject_first, t.subject_last] for t in traces], dtype=np.int64),
            "low": np.array([t.low for t in traces]), "high": np.array([t.high for t in traces])}


def traces_from_arrays(arrays: dict, kinds: list[str], tokens_of) -> list[FactTrace]:
    """Inverse of ``chunk_arrays``; ``tokens_of(index)`` gives a fact's tokens."""
    out = []
    for i in range(len(arrays["index"])):
        n = int(arrays["n_tokens"][i])
        out.append(FactTrace(index=int(arrays["index"][i]), key=int(arrays["key"][i]),
                             tokens=tokens_of(int(arrays["index"][i])), subject_first=int(arrays["subject"][i][0]),
                             subject_last=int(arrays["subject"][i][1]), answer_id=int(arrays["answer"][i]),
                             kinds=list(kinds), scores=torch.as_tensor(arrays["scores"][i][:, :n]),
                             low=float(arrays["low"][i]), high=float(arrays["high"][i])))
    return out


def load_config(path: str | None, **overrides) -> TraceConfig:
    """TraceConfig from a YAML file (keys = field names) with non-None ``overrides`` on top."""
    from dataclasses import fields

    from interpkit.validate import yaml_mapping

    values = yaml_mapping("--config", path) if path else {}
    names = {f.name for f in fields(TraceConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown key(s) in --config {path}: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("kinds"), str):
        values["kinds"] = [values["kinds"]]
    cfg = TraceConfig(**values)
    cfg.validate()
    return cfg


def _kinds_option(kind: str | None) -> list[str] | None:
    if kind is None:
        return None
    if kind == "all":
        return list(BASE_KINDS)
    if kind not in BASE_KINDS:
        raise UserError(f"bad --kind {kind!r}; use hidden, mlp, attn or all")
    return [kind]


def _prompt_set(lm, task: str, fact_file: str | None = None):
    if str(task).lower().endswith((".jsonl", ".csv")):     # --dataset: your own facts (tasks/custom.py)
        from interpkit.tasks.custom import load_dataset

        return load_dataset(task, lm.tokenizer, need_subject=True, echo=print)
    if task == "facts":
        from interpkit.tasks.known_facts import build

        return build(lm.tokenizer, path=fact_file)
    if fact_file is not None:
        raise UserError("--fact-file needs --task facts (a known_1000-format file)")
    if task == "synthetic_facts":
        from interpkit.tasks.synthetic_facts import make_facts, prompt_set

        return prompt_set(lm.tokenizer, make_facts())
    raise UserError(f"bad --task {task!r}; use facts (known_1000) or synthetic_facts")


def causal_trace_command(model: str, facts: int | None = 100, kind: str | None = None, severed: bool | None = None,
                         noise: str | None = None, config: str | None = None, remote: bool = False,
                         task: str = "facts", samples: int | None = None, window: int | None = None,
                         seed: int | None = None, max_rows: int | None = None, engine: str | None = None,
                         root: str = "artifacts",
                         run_id: str | None = None, echo=print, replace: bool | None = None,
                         fact_file: str | None = None, facts_per_chunk: int | None = None) -> TraceResult:
    """``interpkit causal-trace``: trace the first ``facts`` facts the model knows, store chunks, plot.

    The subject-embedding std and the clean top-1 of every prompt come from one batched pass over the
    whole dataset (kept in the manifest, so a resumed run skips it); facts whose top-1 is not the
    attribute are dropped (ROME's filter). Rerunning the same command resumes after the last chunk.
    """
    from interpkit.models import load_model
    from interpkit.store import RunStore

    noise = "subject" if replace and noise is None else noise      # --replace alone: another subject's embeddings
    cfg = load_config(config, kinds=_kinds_option(kind), severed=severed, noise=noise, samples=samples,
                      window=window, seed=seed, max_rows=max_rows, engine=engine, replace=replace,
                      facts_per_chunk=facts_per_chunk)
    if facts is not None and facts < 1:
        raise UserError("--facts must be >= 1")
    lm = load_model(model, remote=remote)
    if cfg.window >= lm.arch.n_layers and any(k in cfg.all_kinds() for k in ("mlp", "attn")):
        echo(f"note: window {cfg.window} >= {lm.arch.n_layers} layers, so every mlp/attn restoration covers "
             f"all layers; pass --window (ROME's 10 suits models with ~40+ layers)")
    prompts = _prompt_set(lm, task, fact_file)
    ident = {**config_dict_of(cfg), "task": task, "facts": facts}
    if fact_file is not None:                      # another file: another run
        import hashlib

        ident["fact_file"] = hashlib.sha256(open(fact_file, "rb").read()).hexdigest()[:16]
    store = RunStore("causal_tracing", ident, model=model, revision=lm.revision, seed=cfg.seed, root=root,
                     run_id=run_id, remote=remote or None)
    if "known_rows" in store.manifest:
        std, rows = store.manifest["subject_std"], store.manifest["known_rows"]
    else:
        from interpkit.analyses.causal_tracing.known_facts_scan import scan_known

        t0 = time.perf_counter()
        scan, _ = scan_known(lm, prompts, facts, subject_mask(prompts), log=echo)
        std, rows = scan.subject_std, scan.known_rows(prompts.answer_ids)
        store.time("dataset_pass", time.perf_counter() - t0)
        store.note(subject_std=std, known_rows=rows, n_dataset=len(prompts), n_scanned=len(scan.top1),
                   n_known=len(rows))
    rows = rows[:facts] if facts is not None else rows
    if not rows:
        raise UserError("the model knows none of the facts; causal tracing needs facts it predicts")
    chosen = prompts.subset(rows)
    if chosen.multi_token:
        echo("score: probability of the whole given answer (product of its teacher-forced token probabilities)")
    width = chosen.input_ids.shape[1]
    kinds = cfg.all_kinds()

    def tokens_of(i):
        return lm.tokenizer.convert_ids_to_tokens(chosen.input_ids[i][chosen.attention_mask[i].bool()].tolist())

    def skip(c):
        return traces_from_arrays(store.read_chunk(c), kinds, tokens_of) if store.has_chunk(c) else None

    def save(c, traces, seconds):
        store.write_chunk(c, chunk_arrays(traces, width), seconds=seconds)
        echo(f"chunk {c}: {len(traces)} facts in {seconds:.1f}s")

    from interpkit.analyses.causal_tracing.noise import MODEL_RULES, build_noise_model

    noise_model = build_noise_model(lm, prompts, cfg) if (cfg.replace or parse_noise(cfg.noise)[0] in MODEL_RULES) else None
    result = run_causal_tracing(lm, chosen, cfg, subject_std=std, on_chunk=save, skip_chunk=skip, noise=noise_model,
                                log=echo)
    from interpkit.analyses.causal_tracing.plots import plot_fact

    figures = [str(p) for p in result.plot(store.dir)]
    figures.append(str(plot_fact(result.facts[0], store.dir / f"fact_{result.facts[0].key}.png")))
    result.to_dataframe().to_csv(store.dir / "aie.csv", index=False)
    summary = result.summary()
    store.note(figures=figures, noise_level=result.noise_level)
    store.finish(**summary)
    echo(format_summary(summary, len(prompts), len(rows)))
    echo(f"results: {store.dir}")
    return result


def config_dict_of(cfg: TraceConfig) -> dict:
    from dataclasses import asdict

    d = asdict(cfg)
    d["kinds"] = cfg.all_kinds()
    return d


def format_summary(summary: dict, n_dataset: int, n_traced: int) -> str:
    """A short text table: per kind, the group and layer of the peak AIE."""
    lines = [f"traced {n_traced} known facts (of {n_dataset}); noise level {summary['noise_level']:.4g}; "
             f"p(answer) clean {summary['high']:.3f}, corrupted {summary['low']:.3f}, ATE {summary['ate']:.3f}",
             f"{'kind':<14}{'peak AIE at':<24}{'layer':>6}{'AIE':>8}   {'last subject token: layer':>26}{'AIE':>8}"]
    for k in BASE_KINDS + SEVERED_KINDS:
        if k in summary:
            s = summary[k]
            lines.append(f"{k:<14}{GROUP_LABELS[s['peak_group']]:<24}{s['peak_layer']:>6}{s['peak_aie']:>8.4f}   "
                         f"{s['subject_layer']:>26}{s['subject_aie']:>8.4f}")
    return "\n".join(lines)
