"""`interpkit probe`: labels from a task's metadata, the run, the summary table."""
from __future__ import annotations

from dataclasses import asdict


from interpkit.errors import UserError


# ----------------------------------------------------------------------------------------------------
# CLI body
# ----------------------------------------------------------------------------------------------------
from interpkit.analyses.probing.linear import ProbeConfig, ProbeResult, labels_from_meta, probe_layers




def probe_command(model: str, task: str, targets: list[str], *, positions: str = "last", n: int = 200,
                  seed: int = 0, remote: bool = False, cfg: ProbeConfig | None = None,
                  root: str = "artifacts", lm=None, prompts=None, split_by: str | None = None) -> ProbeResult:
    """``interpkit probe``: probe ``targets`` (meta fields of ``task``) at every layer.

    ``positions`` is "all", "last" or the name of one of the task's roles; ``split_by`` a meta field whose
    values (e.g. names) stay wholly in train or in test. Writes results.h5, probe.png and a manifest into
    the run directory and prints a summary table with the sample counts.
    """
    from interpkit.models import load_model
    from interpkit.store import RunStore

    cfg = cfg or ProbeConfig(seed=seed)
    lm = lm or load_model(model, remote=remote)
    if prompts is None:
        from interpkit.tasks import get_task
        prompts = get_task(task)(lm.tokenizer, n=n, seed=seed)
    pos = positions
    if positions not in ("all", "last"):
        if positions not in prompts.roles:
            raise UserError(f"positions {positions!r} is neither all/last nor a role of {task!r} "
                            f"({', '.join(sorted(prompts.roles))})")
        pos = prompts.roles[positions]
    labels = labels_from_meta(prompts, targets, "all" if positions == "all" else "one")
    if split_by is not None and split_by not in prompts.meta:
        raise UserError(f"--split-by {split_by!r} is not a field of {task!r}; use one of "
                        f"{', '.join(sorted(prompts.meta))}")
    groups = list(prompts.meta[split_by]) if split_by is not None else None
    ident = {"task": task, "targets": targets, "positions": positions, "n": n, "probe": asdict(cfg)}
    if split_by is not None:
        ident["split_by"] = split_by
    store = RunStore("probe", ident, model=model, seed=seed, root=root, remote=remote)
    res = probe_layers(lm, prompts, labels, positions=pos if positions != "all" else "all", cfg=cfg, groups=groups)
    if not store.has_chunk(0):                     # a rerun recomputes (deterministic) and keeps the stored chunk
        store.write_chunk(0, {"train_acc": res.train_acc.numpy(), "test_acc": res.test_acc.numpy(),
                              "chance": res.chance.numpy(), "test_prompts": res.test_prompts.numpy()})
    res.to_dataframe().to_csv(store.dir / "probe.csv", index=False)
    res.plot(store.dir / "probe.png", title=f"{model} / {task}: probes at {positions}")
    for k, v in res.timings.items():
        store.time(k, v)
    best = {t: {"layer": res.best_layer(t), "test_acc": float(res.test_acc[i].max())} for i, t in enumerate(res.targets)}
    held = sorted({str(groups[i]) for i in res.test_prompts.tolist()}) if groups is not None else []
    split = {"by": split_by or "prompt", "folds": cfg.folds, "train_prompts": len(res.train_prompts),
             "test_prompts": len(res.test_prompts), **({"test_groups": held} if groups is not None and cfg.folds == 1 else {})}
    store.finish(best=best, figure="probe.png", n_rows=res.n_rows, split=split)
    if cfg.folds > 1:
        where = f"{cfg.folds}-fold cross-validation by {split_by or 'prompt'}" + (
            f" ({len(set(groups))} groups, each tested once)" if groups is not None else "")
    else:
        where = f"split by {split_by}: held-out {', '.join(held)}" if groups is not None else "split by prompt"
        where += f"; prompts train {len(res.train_prompts)} / test {len(res.test_prompts)}"
    print(f"{where}; rows (train/test) " + ", ".join(f"{t} {a}/{b}" for t, (a, b) in res.n_rows.items()))
    print(summary_table(res))
    print(f"results: {store.dir}")
    return res


def summary_table(res: ProbeResult) -> str:
    """A plain-text table: one row per layer, test accuracy per target (chance in the header)."""
    head = "layer " + " ".join(f"{t[:12]:>12}" for t in res.targets)
    chance = "chance" + " ".join(f"{float(c):>12.3f}" for c in res.chance)
    lines = [head, chance]
    for j, layer in enumerate(res.layers):
        lines.append(f"{layer:>5} " + " ".join(f"{float(res.test_acc[i, j]):>12.3f}" for i in range(len(res.targets))))
    return "\n".join(lines)
