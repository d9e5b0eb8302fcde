"""The body of ``interpkit patch``: task -> PromptSet -> exact and/or attribution sweep -> store, figures, table.

cli.py parses options and calls ``patch_command``; everything here is plain Python so it is tested
without Typer. Chunks are written to the run store as they finish, so rerunning the same command after
an interruption resumes; the assembled result goes to ``<run dir>/result.h5`` and heatmaps next to it.
"""
from __future__ import annotations

import time

import torch

from analyses.attribution import agreement, run_attribution
from analyses.patching import (PATCH_SITES, PatchConfig, PatchResult, plot_patching, position_labels, role_effect,
                               run_patching)
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
                  top: int = 10, root: str = "artifacts", run_id: str | None = None, reuse_prefix: bool = False,
                  echo=print) -> dict:
    """Run ``interpkit patch``; returns a summary dict (run dir, figures, top cells, agreement).

    ``reuse_prefix`` computes the exact sweep with ``analyses.patching_prefix`` (reuses the unpatched
    prefix through the key/value cache: ~0.4x the work; --by position --region position only; remotely one request;
    stored as one chunk at the end instead of chunk by chunk)."""
    from interpkit.models import load_model
    from interpkit.store import RunStore
    from tasks import get_task

    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    site = resolve_site(site)
    by = by or ("head" if site == "head_out" else "position")
    cfg = PatchConfig(site=site, by=by, region=region, window=window, mode=mode, direction=direction, metric=metric,
                      layers=layers, positions=positions, max_rows=max_rows)
    builder = get_task(task)
    lm = load_model(model, remote=remote)
    cfg.validate(lm.arch.n_layers, lm.arch.n_heads)
    prompts = builder(lm.tokenizer, n=n, seed=seed)
    store = RunStore("patching", {"task": task, "n": n, "method": method, **vars(cfg)}, model=model, seed=seed,
                     root=root, run_id=run_id)
    echo(f"patching {task} ({len(prompts)} pairs, {prompts.input_ids.shape[1]} tokens) on {model}: "
         f"{method}, {site} by {by}, {direction}{', remote' if remote else ''}")

    results = {}
    for name in (("exact", "attribution") if method == "both" else (method,)):
        results[name] = _run_stored(store, name, lm, prompts, cfg, reuse_prefix)
    labels = position_labels(prompts, lm.tokenizer) if by == "position" else [f"H{h}" for h in range(lm.arch.n_heads)]
    labels = [labels[c] for c in next(iter(results.values())).cells] if by == "position" else labels
    summary = {"run_dir": str(store.dir), "pairs": len(prompts), "figures": []}
    for name, res in results.items():
        _save_result(store, name, res, labels)
        summary["figures"] += _figures(store, name, res, prompts, labels)
        summary[f"{name}_top"] = top_cells(res, labels, top)
        summary[f"{name}_seconds"] = round(res.timings["sweep_s"], 3)
    if method == "both":
        summary["agreement"] = agreement(results["exact"], results["attribution"], k=top)
    res = next(iter(results.values()))
    summary["metric_base"], summary["metric_source"] = float(res.base.mean()), float(res.source.mean())
    store.note(figures=summary["figures"], result="result.h5")
    store.finish(**{k: v for k, v in summary.items() if k not in ("run_dir", "figures")})
    _print_table(summary, results, top, echo)
    return summary


def _run_stored(store, name: str, lm, prompts, cfg: PatchConfig, reuse_prefix: bool = False) -> PatchResult:
    """One method's sweep, resuming from and writing chunks named ``<method>-<index>``."""
    if name == "exact" and reuse_prefix:
        return _run_prefix_stored(store, lm, prompts, cfg)

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

    res = RUNNERS[name](lm, prompts, cfg, on_chunk=on_chunk, done=done)
    store.time(f"{name}_sweep", res.timings["sweep_s"])
    return res


def _run_prefix_stored(store, lm, prompts, cfg: PatchConfig) -> PatchResult:
    """The prefix-reuse sweep, stored as one chunk (values, base and source metrics); a rerun reads it back."""
    from analyses.patching_prefix import run_prefix_patching

    if store.has_chunk("exact-prefix"):
        arrays = {k: torch.as_tensor(v) for k, v in store.read_chunk("exact-prefix").items()}
        return PatchResult(config=cfg, layers=arrays["layers"].tolist(), cells=arrays["cells"].tolist(),
                           values=arrays["values"], base=arrays["base"], source=arrays["source"],
                           timings={"sweep_s": 0.0, "forwards": 0})
    res = run_prefix_patching(lm, prompts, cfg)
    store.write_chunk("exact-prefix", {"values": res.values.numpy(), "base": res.base.numpy(),
                                       "source": res.source.numpy(), "layers": torch.tensor(res.layers).numpy(),
                                       "cells": torch.tensor(res.cells).numpy()}, seconds=res.timings["sweep_s"])
    store.time("exact_sweep", res.timings["sweep_s"])
    return res


def _save_result(store, name: str, res: PatchResult, labels: list[str]) -> None:
    import h5py

    with h5py.File(store.dir / "result.h5", "a") as f:
        if name in f:
            del f[name]
        g = f.create_group(name)
        for key, value in (("values", res.values), ("base", res.base), ("source", res.source),
                           ("effect", res.effect()), ("clean_normalized", res.clean_normalized.nanmean(0)),
                           ("layers", torch.tensor(res.layers)), ("cells", torch.tensor(res.cells))):
            g.create_dataset(key, data=value.numpy())
        g.create_dataset("labels", data=[s.encode() for s in labels])
        g.attrs["by"] = res.config.by


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
    for name in results:
        echo(f"{name}: {summary[f'{name}_seconds']:.2f} s; top {top} cells (normalised effect, 0 = base, 1 = source)")
        by = results[name].config.by
        for row in summary[f"{name}_top"]:
            echo(f"  layer {row['layer']:>3}  {str(row[by]):<28} {row['effect']:+.4f}")
    if "agreement" in summary:
        a = summary["agreement"]
        echo("attribution vs exact: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in a.items()))
    echo(f"results: {summary['run_dir']}/result.h5")
    for path in summary["figures"]:
        echo(f"figure:  {path}")
