"""`interpkit circle`: the run, the studies it asks for, figures and the summary table."""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from interpkit.analyses.circles.studies import DEFAULT_STEPS, deconstruct
from interpkit.analyses.probing.linear import collect_residuals, random_like
from interpkit.errors import UserError


# ----------------------------------------------------------------------------------------------------
# CLI body
# ----------------------------------------------------------------------------------------------------
from interpkit.analyses.circles.features import CircleConfig, CircleResult, PERIODS, circle_sweep, run_circles


def circle_command(task: str, model: str, *, remote: bool = False, cfg: CircleConfig | None = None,
                   random_baseline: bool = True, seed: int = 0, root: str = "artifacts",
                   lm=None, prompts=None, sweep: tuple[int, int, int] | None = None,
                   rgb_layers: list[int] | None = None, rgb_role: str = "end",
                   rgb_steps: tuple[str, ...] | None = None) -> CircleResult:
    """``interpkit circle --task days|months --model NAME [--remote]``.

    Writes results.h5 (probe and interventions), r2.png (with the random-init baseline unless remote or
    disabled), scatter.png, interventions.png and a manifest; prints a summary table.
    ``sweep=(layer, from, to)``: intervening inside the circle (sweep.png, sweep.csv); ``rgb_layers``:
    residual RGB plots / feature deconstruction at ``rgb_role`` (rgb_layer<l>.png, deconstruction.csv).
    See ``analyses.circles.studies``.
    """
    from interpkit.models import load_model
    from interpkit.store import RunStore

    cfg = cfg or CircleConfig(seed=seed)
    lm = lm or load_model(model, remote=remote)
    if prompts is None:
        from interpkit.tasks import get_task
        prompts = get_task(task)(lm.tokenizer)
    _check_studies(lm, prompts, cfg, sweep, rgb_layers, rgb_role)          # fail before the long part
    store = RunStore("circle", {"task": task, "circle": asdict(cfg), "random_baseline": random_baseline},
                     model=model, seed=seed, root=root, remote=remote)
    res = run_circles(lm, prompts, cfg)
    base = None
    if random_baseline and not lm.remote:
        base = run_circles(random_like(lm, seed), prompts, CircleConfig(**{**asdict(cfg), "intervene": False}))
    arrays = {"r2": res.fit.r2.numpy(), "r2_heldout": res.fit.r2_heldout.numpy(), "values": res.values.numpy(),
              "coords": res.coords.numpy(), "pcs": res.pcs.numpy()}
    if res.logit_diff is not None:
        arrays.update(logit_diff=res.logit_diff.numpy(), flip_rate=res.flip_rate.numpy())
    if base is not None:
        arrays.update(random_r2=base.fit.r2.numpy(), random_r2_heldout=base.fit.r2_heldout.numpy())
    if not store.has_chunk(0):                     # a rerun recomputes (deterministic) and keeps the stored chunk
        store.write_chunk(0, {k: v[None] for k, v in arrays.items()})
    res.probe_dataframe().to_csv(store.dir / "circle_probe.csv", index=False)
    res.plot_r2(store.dir / "r2.png", label=model, other=base)
    res.plot_scatter(store.dir / "scatter.png")
    figures = ["r2.png", "scatter.png"]
    if res.logit_diff is not None:
        res.to_dataframe().to_csv(store.dir / "interventions.csv", index=False)
        res.plot_interventions(store.dir / "interventions.png")
        figures.append("interventions.png")
    extra = _studies(lm, prompts, res, store.dir, sweep, rgb_layers, rgb_role, rgb_steps, figures)
    lines = extra.pop("lines")
    for k, v in res.timings.items():
        store.time(k, float(v))
    store.finish(**summary(res, base), **extra, figures=figures)
    print(summary_table(res, base))
    for line in lines:
        print(line)
    print(f"results: {store.dir}")
    return res


def _check_studies(lm, prompts, cfg: CircleConfig, sweep, rgb_layers, rgb_role) -> None:
    """One-line errors for the sweep / RGB options before any forward runs."""
    L = lm.arch.n_layers
    if sweep is not None:
        layer, frm, to = sweep
        p = cfg.period or PERIODS.get(prompts.task)
        if not 0 <= layer < L:
            raise UserError(f"--sweep-layer {layer} is out of range; the sweep uses layers 0..{L - 1}")
        if p is not None and not (0 <= frm < p and 0 <= to < p and frm != to):
            raise UserError(f"--sweep-between {frm},{to}: two different values in 0..{p - 1}")
        if tuple(cfg.probe_on) != ("cos", "sin") or cfg.role not in ("start", "duration"):
            raise UserError("the sweep needs --probe-on cos,sin and --role start or duration")
    if rgb_layers:
        prompts.role(rgb_role)                      # a one-line error when the task has no such role
        if any(not 0 <= l <= L for l in rgb_layers):
            raise UserError(f"--rgb-layers: layers 0..{L} (0 = embeddings)")


def _studies(lm, prompts, res: CircleResult, out, sweep, rgb_layers, rgb_role, rgb_steps, figures) -> dict:
    """The optional middle-of-circle sweep and residual RGB deconstruction of ``circle_command`` (options
    checked by ``_check_studies``)."""
    import pandas as pd

    extra: dict = {"lines": []}
    if sweep is not None:
        layer, frm, to = sweep
        t0 = time.perf_counter()
        sw = circle_sweep(lm, prompts, res.fit, layer, frm, to, role=res.role, max_rows=res.config.max_rows)
        res.timings["sweep_s"] = time.perf_counter() - t0
        rows = [dict(radius=r, angle_deg=float(np.degrees(t)), share_from=sw.share_from[i, j],
                     share_to=sw.share_to[i, j], share_other=sw.share_other[i, j], logit_diff=sw.logit_diff[i, j])
                for i, r in enumerate(sw.radii) for j, t in enumerate(sw.angles)]
        pd.DataFrame(rows).to_csv(out / "sweep.csv", index=False)
        sw.plot(out / "sweep.png", task=res.task)
        figures.append("sweep.png")
        extra["sweep"] = {"layer": layer, "from": frm, "to": to}
        extra["lines"] += [f"sweep at layer {layer} from value {frm} to {to}: share of problems whose answer implies "
                           f"{to} (rows: radius, columns: angle in degrees)", sw.table()]
    if rgb_layers:
        acts = collect_residuals(lm, prompts, prompts.roles[rgb_role], chunk_rows=res.config.chunk_rows)
        a, b, c = (np.array(prompts.meta[k]) for k in ("a", "b", "c"))
        steps = tuple(rgb_steps or DEFAULT_STEPS)
        table = []
        for layer in rgb_layers:
            dc = deconstruct(acts[:, layer].numpy(), a, b, c, res.fit.period, steps, layer, rgb_role)
            dc.plot(out / f"rgb_layer{layer}.png", task=res.task)
            figures.append(f"rgb_layer{layer}.png")
            table.append({"layer": layer, **{f"r2_after_{s}": r for s, r in zip(dc.steps[1:], dc.r2[1:])}})
            extra["lines"].append(f"deconstruction at layer {layer}, token '{rgb_role}': variance explained "
                                  + ", ".join(f"+{s} {r:.3f}" for s, r in zip(dc.steps[1:], dc.r2[1:])))
        pd.DataFrame(table).to_csv(out / "deconstruction.csv", index=False)
        extra["deconstruction"] = table
    return extra


def summary(res: CircleResult, base: CircleResult | None = None) -> dict:
    out = {"accuracy": res.accuracy, "best_layer": int(res.fit.r2.argmax()), "best_r2": float(res.fit.r2.max()),
           "best_r2_heldout": float(res.fit.r2_heldout.nan_to_num(-1).max())}
    if base is not None:
        out.update(random_best_r2=float(base.fit.r2.max()),
                   random_best_r2_heldout=float(base.fit.r2_heldout.nan_to_num(-1).max()))
    if res.logit_diff is not None:
        out["noop_logit_diff"] = res.noop_logit_diff
        for a, m in enumerate(res.methods):
            b = int(res.logit_diff[a].argmin())
            out[f"{m}_best"] = {"layer": res.layers[b], "logit_diff": float(res.logit_diff[a, b]),
                                "flip_rate": float(res.flip_rate[a, b])}
    return out


def summary_table(res: CircleResult, base: CircleResult | None = None) -> str:
    """Per layer: R^2 (in-sample / held-out), random-init R^2, and each method's logit diff / flip rate."""
    fits = [(res.fit, 6, "R2", "R2-ho")] + ([(base.fit, 7, "rnd R2", "rnd ho")] if base is not None else [])
    head = f"{'layer':>5}" + "".join(f" {name:>{w}} {ho:>{w}}" for _, w, name, ho in fits)
    head += "".join(f" {m + ' LD':>10} {m + ' flip':>10}" for m in res.methods)
    lines = [f"{res.task} / role {res.role}: clean accuracy {res.accuracy:.3f}, "
             f"no-op logit diff {res.noop_logit_diff:.2f}", head]
    for layer in range(len(res.fit.r2)):
        s = f"{layer:>5}" + "".join(f" {float(fit.r2[layer]):>{w}.3f} {float(fit.r2_heldout[layer]):>{w}.3f}"
                                    for fit, w, _, _ in fits)
        if layer in res.layers:
            b = res.layers.index(layer)
            s += "".join(f" {float(res.logit_diff[a, b]):>10.2f} {float(res.flip_rate[a, b]):>10.2f}"
                         for a in range(len(res.methods)))
        lines.append(s)
    return "\n".join(lines)
