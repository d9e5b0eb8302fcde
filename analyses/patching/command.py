"""The body of ``interpkit patch``: task -> PromptSet -> exact and/or attribution sweep -> store, figures, table.

cli.py parses options and calls ``patch_command``; everything here is plain Python so it is tested
without Typer. Chunks are written to the run store as they finish, so rerunning the same command after
an interruption resumes; the assembled result of each method goes into the same ``<run dir>/results.h5``
(group ``result/<method>``, ``RunStore.write_result``) and heatmaps next to it.
"""
from __future__ import annotations

import time

import torch

from interpkit.analyses.patching.attribution import agreement, run_attribution
from interpkit.analyses.patching.sweep import (ENGINES, PATCH_SITES, PatchConfig, PatchResult, execute, heatmap_labels, plan_patching,
                               plot_patching, role_effect, run_patching)
from interpkit.errors import UserError

SITE_ALIASES = {"resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out", "head": "head_out"}
METHODS = ("exact", "attribution", "both")
RUNNERS = {"exact": run_patching, "attribution": run_attribution}


def resolve_site(site: str) -> str:
    name = SITE_ALIASES.get(site, site)
    if name not in PATCH_SITES:
        raise UserError(f"unknown --site {site!r}; use one of {', '.join(list(SITE_ALIASES) + list(PATCH_SITES))}")
    return name


def patch_command(task: str, model: str, site: str = "resid", method: str = "exact", direction: str = "denoise",
                  by: str | None = None, remote: bool | str = False, n: int = 64, seed: int = 0,
                  layers: list[int] | None = None, positions: list[int] | None = None, region: str = "position",
                  window: int = 1, mode: str = "substitution", metric: str = "logit_diff", max_rows: int = 512,
                  top: int = 10, root: str = "artifacts", run_id: str | None = None, engine: str = "prefix",
                  normalize: str = "pair", min_gap: float = 0.1, echo=print) -> dict:
    """Run ``interpkit patch``; returns a summary dict (run dir, figures, top cells, agreement).

    ``engine``: "prefix" (default: provably-zero cells skipped, the rest on the base run's key/value cache)
    or "full" (the plain reference: whole prompts, every layer). ``normalize``: "pair" (each pair by its own
    base-source gap) or "mean" (the batch-mean metric, TransformerLens's convention); pairs whose gap is below
    ``min_gap`` x the median gap are excluded and counted (they only change the printed/assembled effects)."""
    from interpkit.models import load_model
    from interpkit.store import RunStore
    from interpkit.tasks import get_task

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    _check_options(n=n, method=method, site=site, by=by, region=region, window=window, max_rows=max_rows,
                   layers=layers, engine=engine, normalize=normalize, min_gap=min_gap, run_id=run_id)
    site = resolve_site(site)
    by = by or ("head" if site == "head_out" else "position")
    cfg = PatchConfig(site=site, by=by, region=region, window=window, mode=mode, direction=direction, metric=metric,
                      layers=layers, positions=positions, max_rows=max_rows, engine=engine)
    builder = get_task(task)
    lm = load_model(model, remote=remote)
    cfg.validate(lm.arch.n_layers)
    prompts = builder(lm.tokenizer, n=n, seed=seed)
    store = RunStore("patching", {"task": task, "n": n, "method": method, **vars(cfg)}, model=model, seed=seed,
                     root=root, run_id=run_id, remote=remote)
    (store.dir / "result.h5").unlink(missing_ok=True)      # the separate copy earlier versions wrote
    echo(f"patching {task} ({len(prompts)} pairs, {prompts.input_ids.shape[1]} tokens) on {model}: "
         f"{method}, {site} by {by}, {direction}{', remote' if remote else ''}")
    if prompts.multi_token:
        echo("metric: summed teacher-forced log-probability of the answer"
             + (" minus that of the wrong answer" if prompts.wrong_ids is not None else "") + " (multi-token answers)")

    results = {}
    for name in (("exact", "attribution") if method == "both" else (method,)):
        results[name] = _run_stored(store, name, lm, prompts, cfg, echo)
        results[name].normalize, results[name].min_gap = normalize, min_gap
    labels = heatmap_labels(prompts, lm.tokenizer) if by == "position" else [f"H{h}" for h in range(lm.arch.n_heads)]
    labels = [labels[c] for c in next(iter(results.values())).cells] if by == "position" else labels
    excluded = int(next(iter(results.values())).excluded.sum())
    summary = {"run_dir": str(store.dir), "pairs": len(prompts), "figures": [], "normalize": normalize,
               "min_gap": min_gap, "excluded_pairs": excluded}
    for name, res in results.items():
        _save_result(store, name, res, labels)
        summary["figures"] += _figures(store, name, res, prompts, labels)
        summary[f"{name}_top"] = top_cells(res, labels, top)
        summary[f"{name}_seconds"] = round(res.timings["sweep_s"], 3)
    if method == "both":
        summary["agreement"] = agreement(results["exact"], results["attribution"], k=top)
    res = next(iter(results.values()))
    summary["metric_base"], summary["metric_source"] = float(res.base.mean()), float(res.source.mean())
    store.note(figures=summary["figures"], result=[f"results.h5:result/{name}" for name in results])
    store.finish(**{k: v for k, v in summary.items() if k not in ("run_dir", "figures")})
    _print_table(summary, results, top, echo)
    return summary


def _check_options(*, n: int, method: str, site: str, by: str | None, region: str, window: int, max_rows: int,
                   layers: list[int] | None, engine: str, normalize: str, min_gap: float,
                   run_id: str | None) -> None:
    """Counts, ranges and flag combinations, before anything is loaded (one-line UserError each)."""
    from interpkit import validate as V

    V.count("--n", n)
    V.count("--window", window)
    V.count("--max-rows", max_rows)
    V.int_list("--layers", layers)
    V.choice("--normalize", normalize, ("pair", "mean"))
    V.in_range("--min-gap", min_gap, 0.0, 1.0)
    V.run_id(run_id)
    head = by == "head" or (by is None and resolve_site(site) == "head_out")
    V.conflict(head and region != "position", f"--region {region} patches a span of positions, but heads are "
               f"patched at every position (--site head / --by head); drop --region or use --by position")
    V.conflict(region != "window" and window != 1, f"--window {window} only applies to --region window")
    V.choice("--engine", engine, ENGINES)
    V.conflict(engine != "prefix" and method == "attribution", f"--engine {engine} chooses how exact patching "
               f"runs; --method attribution has no engine: drop --engine")


def _run_stored(store, name: str, lm, prompts, cfg: PatchConfig, echo=print) -> PatchResult:
    """One method's sweep, resuming from and writing chunks named ``<method>-<index>``."""
    from interpkit.progress import stage

    def key(i):
        return f"{name}-{i:06d}"

    done = {}
    for chunk in store.done_chunks():
        if chunk.startswith(name + "-") and chunk.split("-")[1].isdigit():
            arrays = {k: torch.as_tensor(v) for k, v in store.read_chunk(chunk).items()}
            done[int(chunk.split("-")[1])] = arrays["values"] if name == "exact" else arrays
    clock = [time.perf_counter()]

    def on_chunk(i, out):
        arrays = {"values": out.numpy()} if name == "exact" else {k: v.numpy() for k, v in out.items()}
        now = time.perf_counter()
        store.write_chunk(key(i), arrays, seconds=now - clock[0])
        clock[0] = now

    if name == "exact" and cfg.engine == "prefix":
        sweep = plan_patching(lm, prompts, cfg)
        n = len(sweep.plan.chunks)
        echo(f"exact: {n} chunks, {float(sweep.plan.skipped.float().mean()):.0%} of cells provably unchanged "
             f"(skipped), {sweep.plan.work:.3f} of the full sweep's token-layers to compute"
             + (f"; reusing {len(done)} stored chunks" if done else ""))
        with stage("exact patching", n - len(done), "chunks") as bar:
            res = execute(lm, cfg, sweep, on_chunk=on_chunk, done=done, progress=bar)
    else:
        if done:
            echo(f"{name}: reusing {len(done)} stored chunks")
        res = RUNNERS[name](lm, prompts, cfg, on_chunk=on_chunk, done=done)
    store.time(f"{name}_sweep", res.timings["sweep_s"])
    return res


def _save_result(store, name: str, res: PatchResult, labels: list[str]) -> None:
    """Method ``name``'s assembled result into results.h5 (``result/<name>``, replacing an earlier one)."""
    arrays = {key: value.numpy() for key, value in (
        ("values", res.values), ("base", res.base), ("source", res.source), ("effect", res.effect()),
        ("clean_normalized", res.clean_normalized.nanmean(0)), ("layers", torch.tensor(res.layers)),
        ("cells", torch.tensor(res.cells)), ("excluded_pairs", res.excluded))}
    arrays["labels"] = [s.encode() for s in labels]
    if res.skipped is not None:                        # cells provably equal to the base run (not computed)
        arrays["skipped"] = res.skipped.numpy()
    store.write_result(name, arrays, attrs={"by": res.config.by, "normalize": res.normalize, "min_gap": res.min_gap})


def _figures(store, name: str, res: PatchResult, prompts, labels: list[str]) -> list[str]:
    cfg = res.config
    stem = f"{name}_{cfg.site}_{cfg.by}_{cfg.direction}"
    paths = [plot_patching(res, labels, store.dir / f"{stem}.png")]
    if cfg.by == "position" and cfg.region == "position" and prompts.roles:
        roles, matrix = role_effect(res, prompts)
        if roles:
            paths.append(plot_patching(res, roles, store.dir / f"{stem}_roles.png", matrix=matrix,
                                       title=f"{name} patching by role, {cfg.site}, {cfg.direction}"))
    return paths


def top_cells(res: PatchResult, labels: list[str], k: int) -> list[dict]:
    """The k cells with the largest |mean normalised effect|."""
    eff = res.effect()
    flat = eff.nan_to_num().abs().flatten()
    out = []
    for idx in flat.topk(min(k, flat.numel())).indices.tolist():
        li, ci = divmod(idx, eff.shape[1])
        out.append({"layer": res.layers[li], res.config.by: labels[ci], "effect": round(float(eff[li, ci]), 4)})
    return out


def _print_table(summary: dict, results: dict, top: int, echo) -> None:
    echo(f"metric (mean over pairs): base {summary['metric_base']:.4f}, source {summary['metric_source']:.4f}")
    echo(f"normalised by {'the batch-mean gap' if summary['normalize'] == 'mean' else 'each pair'}; "
         f"{summary['excluded_pairs']} of {summary['pairs']} pairs excluded (|source - base| < "
         f"{summary['min_gap']:g} x median)")
    for name in results:
        echo(f"{name}: {summary[f'{name}_seconds']:.2f} s; top {top} cells (normalised effect, 0 = base, 1 = source)")
        by = results[name].config.by
        for row in summary[f"{name}_top"]:
            echo(f"  layer {row['layer']:>3}  {str(row[by]):<28} {row['effect']:+.4f}")
    if "agreement" in summary:
        a = summary["agreement"]
        echo("attribution vs exact: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in a.items()))
    echo(f"results: {summary['run_dir']}/results.h5 (" + ", ".join(f"result/{name}" for name in results) + ")")
    for path in summary["figures"]:
        echo(f"figure:  {path}")
