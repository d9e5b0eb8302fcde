"""Bodies of ``interpkit attn-trace`` and ``interpkit circuit`` (cli.py parses options and calls these).

attn-trace: task -> PromptSet -> one activation trace per prompt batch -> per-prompt graphs. Each batch
is a run-store chunk (records of every traced edge side, per-prompt status) written after its graphs
(``graphs/prompt_XXXXX.graphml`` and ``.cyjs``), so an interrupted run resumes after the last finished
batch. At the end: ``unified.graphml`` / ``unified.cyjs`` (Cytoscape JSON) / ``unified.png``.

circuit (on an attn-trace run directory): ``unify`` (again, optionally pruned by node frequency),
``intervene`` (edge interventions -> ``interventions.csv``; ``--what input``: full signal removal vs a
random equal-size subspace -> ``signal_removal.csv``), ``prune`` (-> ``circuit.graphml`` / ``.cyjs`` /
``.png``), ``compare`` (precision / recall / F1 against the task's reference circuits -> ``compare.json``,
``compare.png``), ``sweep`` (circuit size, faithfulness and P/R/F1 vs the pruning threshold ->
``sweep.csv``, ``sweep.png``), ``sparsity`` (components used per edge vs the rank -> ``sparsity.csv``,
``sparsity.png``), ``control`` (control signals and their clusters -> ``control_heads.csv``,
``control.json``, ``control.png``). See ``studies``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from interpkit.analyses.attention_tracing import graphs as gr
from interpkit.analyses.attention_tracing.trace import AttnTraceConfig, AttnTraceResult, trace_prompts
from interpkit.errors import UserError
from interpkit.progress import stage

ANALYSIS = "attn_trace"
_FIELDS = ("prompt", "layer", "head", "dest", "src", "n_selected", "rank", "total", "selected_total", "bias",
           "attention")
ACTIONS = ("unify", "intervene", "prune", "compare", "sweep", "sparsity", "control")


def _needs_local_weights(lm) -> None:
    if next(lm.hf.parameters()).is_meta:
        raise UserError("attention tracing needs W_O and the unembedding on this machine (Omega itself can be "
                        "computed on NDIF: analyses.attention_tracing.remote_omega); use a local or "
                        "tiny:<family> model")


def _records_to_arrays(records: list[dict], rows: list[int], status: list[str]) -> dict:
    arrays = {k: np.array([r[k] for r in records], dtype=np.float64 if k in ("total", "selected_total", "bias",
              "attention") else np.int64) for k in _FIELDS}
    arrays["side"] = np.array([0 if r["side"] == "q" else 1 for r in records], dtype=np.int8)
    arrays["prompts"] = np.array(rows, dtype=np.int64)
    arrays["status"] = np.array([s.encode() for s in status], dtype="S32")
    return arrays


def _arrays_to_records(arrays: dict) -> tuple[list[dict], list[int], list[str]]:
    n = len(arrays["side"])
    recs = [{k: (float(arrays[k][i]) if arrays[k].dtype.kind == "f" else int(arrays[k][i])) for k in _FIELDS}
            | {"side": "q" if arrays["side"][i] == 0 else "k"} for i in range(n)]
    return recs, arrays["prompts"].tolist(), [s.decode() for s in arrays["status"]]


def _graph_path(run_dir: Path, pid: int) -> Path:
    return run_dir / "graphs" / f"prompt_{pid:05d}.graphml"


def attn_trace_command(task: str, model: str, n: int = 16, seed: int = 0, remote: bool | str = False,
                       batch_size: int = 8, attn_factor: float = 1.0, signal_share: float = 1.0,
                       seed_share: float = 1.0, upstream_share: float = 0.7, min_trace_layer: int = 1,
                       require_correct: bool = True, labels: str = "role", center: bool = True,
                       root: str = "artifacts", run_id: str | None = None, cache_dir: str | None = None,
                       echo=print) -> dict:
    """Run ``interpkit attn-trace``; returns a summary dict (run dir, counts, sparsity, files)."""
    from interpkit.analyses.attention_tracing.omega import Omega, default_cache_dir
    from interpkit.models import load_model
    from interpkit.store import RunStore
    from interpkit.tasks import get_task

    cfg = AttnTraceConfig(task=task, n_prompts=n, seed=seed, batch_size=batch_size, attn_factor=attn_factor,
                      signal_share=signal_share, seed_share=seed_share, upstream_share=upstream_share,
                      min_trace_layer=min_trace_layer, require_correct=require_correct, labels=labels,
                      center=center)
    cfg.validate()
    builder = get_task(task)
    lm = load_model(model, remote=remote)
    _needs_local_weights(lm)
    prompts = builder(lm.tokenizer, n=n, seed=seed)
    store = RunStore(ANALYSIS, asdict(cfg), model=model, seed=seed, root=root, run_id=run_id, remote=remote)
    (store.dir / "graphs").mkdir(exist_ok=True)
    omega = Omega(lm.arch, model, lm.revision, cache_dir=cache_dir or default_cache_dir(), center=center)
    echo(f"attn-trace {task} ({len(prompts)} prompts) on {model}{', remote' if remote else ''}: run {store.dir}")

    reused = [0]

    def skip(i):
        if not store.has_chunk(i):
            return None
        reused[0] += 1
        recs, rows, status = _arrays_to_records(store.read_chunk(i))
        graphs = [gr.read_graphml(_graph_path(store.dir, p)) if s == "traced" else None for p, s in zip(rows, status)]
        return graphs, status, recs

    clock = [time.perf_counter()]

    def on_batch(i, rows, graphs, status, records):
        bar.advance(len(rows))
        for pid, G in zip(rows, graphs):
            if G is not None:
                gr.write_graphml(G, _graph_path(store.dir, pid))
                gr.write_cytoscape(G, _graph_path(store.dir, pid).with_suffix(".cyjs"))
        now = time.perf_counter()
        store.write_chunk(i, _records_to_arrays(records, rows, status), seconds=now - clock[0])
        clock[0] = now

    with stage("attention-causal tracing", len(prompts), "prompts") as bar:
        res = trace_prompts(lm, prompts, cfg, omega=omega, on_batch=on_batch, skip=skip)
    if reused[0]:
        echo(f"reused {reused[0]} stored batch(es) of {cfg.batch_size} prompts")
    if not res.traced:
        why = ", ".join(f"{s}: {res.status.count(s)}" for s in sorted(set(res.status)))
        raise UserError(f"none of the {len(res.status)} prompts qualified for tracing ({why}); pass "
                        f"--no-require-correct, more --prompts or another model")
    store.time("trace", res.timings["trace_s"])
    summary = _trace_summary(res)
    files = _write_unified(store.dir, res.unified())
    store.note(files=files, omega_cache=str(omega.path))
    store.finish(**summary)
    summary.update(run_dir=str(store.dir), files=files)
    _print_trace(summary, echo)
    return summary


def _trace_summary(res: AttnTraceResult) -> dict:
    recs = res.to_dataframe()
    out = {"prompts": len(res.status), "traced": len(res.traced),
           "skipped": {s: res.status.count(s) for s in set(res.status) if s != "traced"},
           "trace_seconds": round(res.timings["trace_s"], 3)}
    if len(recs):
        for side in ("q", "k"):
            r = recs[(recs.side == side) & (recs.n_selected > 0)]
            out[f"{side}_edges"] = int(len(r))
            out[f"{side}_mean_components"] = round(float(r.n_selected.mean()), 3) if len(r) else None
            frac = float((r.n_selected / r["rank"]).mean()) if len(r) else None
            out[f"{side}_mean_fraction_of_rank"] = None if frac is None else round(frac, 4)
    return out


def _write_unified(run_dir: Path, U, name: str = "unified") -> list[str]:
    files = [gr.write_graphml(U, run_dir / f"{name}.graphml"), gr.write_cytoscape(U, run_dir / f"{name}.cyjs")]
    if U.number_of_edges():
        P = gr.prune_by_frequency(U, 0.25) if U.number_of_nodes() > 40 else U
        files.append(gr.plot_circuit(P, run_dir / f"{name}.png",
                                     title=f"{name}: {U.number_of_nodes()} nodes (plot: seen in >= 25% of prompts)"
                                     if P is not U else ""))
    return [str(f) for f in files]


def _print_trace(summary: dict, echo) -> None:
    echo(f"traced {summary['traced']}/{summary['prompts']} prompts in {summary['trace_seconds']:.2f} s"
         + (f" (skipped: {summary['skipped']})" if summary["skipped"] else ""))
    for side, name in (("q", "query"), ("k", "key")):
        if summary.get(f"{side}_edges"):
            echo(f"  {name} side: {summary[f'{side}_edges']} edges with a signal, "
                 f"{summary[f'{side}_mean_components']} components on average "
                 f"({100 * summary[f'{side}_mean_fraction_of_rank']:.1f}% of d_head)")
    for f in summary["files"]:
        echo(f"  wrote {f}")


# -- circuit --------------------------------------------------------------------------------------
def _open_run(run: str) -> tuple[Path, dict]:
    run_dir = Path(run)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise UserError(f"{run} is not an attn-trace run directory (no manifest.json); pass --run "
                        f"artifacts/{ANALYSIS}/<run-id>")
    m = json.loads(manifest.read_text())
    if m.get("analysis") != ANALYSIS:
        raise UserError(f"{run} is a {m.get('analysis')!r} run, not {ANALYSIS}")
    return run_dir, m


def _load_graphs(run_dir: Path) -> dict:
    paths = sorted((run_dir / "graphs").glob("prompt_*.graphml"))
    if not paths:
        raise UserError(f"{run_dir} has no traced graphs; run interpkit attn-trace first (or check its skips)")
    return {int(p.stem.split("_")[1]): gr.read_graphml(p) for p in paths}


def _load_records(run_dir: Path) -> list[dict]:
    import h5py

    recs = []
    with h5py.File(run_dir / "results.h5", "r") as f:
        for name in sorted(f["chunks"].keys()):
            g = f["chunks"][name]
            recs += _arrays_to_records({k: g[k][()] for k in g.keys()})[0]
    return recs


def circuit_command(action: str, run: str, remote: bool | str = False, min_prompts: int = 15,
                    min_effect: float = 0.2, min_frequency: float = 0.0, max_prompts_per_edge: int = 32,
                    what: str = "edge", reference: str | None = None, include_mlp: bool | None = None,
                    max_rows: int = 64, seed: int = 0, cache_dir: str | None = None,
                    thresholds: list[float] | None = None, attn_thresh: float = 0.4, similarity: float = 0.5,
                    cluster_threshold: float = 0.97, default_src: int = 0, max_prompts: int = 16,
                    echo=print) -> dict:
    """Run ``interpkit circuit <action> --run <attn-trace run dir>``; returns a summary dict.

    ``cache_dir``: Omega cache directory (default: the one the trace used, from its manifest).
    ``reference``: a name in ``reference_circuits.REFERENCES`` or a file; default: the task's references.
    ``include_mlp``: None = as the paper compares (MLPs for GT and GP references, not for IOI).
    """
    if action not in ACTIONS:
        raise UserError(f"unknown circuit action {action!r}; use one of {', '.join(ACTIONS)}")
    run_dir, manifest = _open_run(run)
    if action == "unify":
        return _unify(run_dir, min_frequency, echo)
    if action == "intervene":
        return _intervene(run_dir, manifest, remote, what, max_prompts_per_edge, max_rows, seed, cache_dir, echo)
    if action == "prune":
        return _prune(run_dir, min_prompts, min_effect, echo)
    if action == "sweep":
        return _sweep(run_dir, manifest, remote, min_prompts, thresholds, reference, include_mlp, cache_dir,
                      max_prompts, echo)
    if action == "sparsity":
        return _sparsity(run_dir, manifest, echo)
    if action == "control":
        return _control(run_dir, manifest, remote, attn_thresh, similarity, cluster_threshold, default_src,
                        max_prompts, cache_dir, echo)
    return _compare(run_dir, manifest, reference, include_mlp, echo)


def _unify(run_dir: Path, min_frequency: float, echo) -> dict:
    graphs = _load_graphs(run_dir)
    U = gr.unify(list(graphs.values()), list(graphs))
    if min_frequency > 0:
        U = gr.prune_by_frequency(U, min_frequency)
        if U.number_of_nodes() == 0:
            raise UserError(f"no node is seen in >= {min_frequency:g} of the {len(graphs)} prompts; lower "
                            f"--min-frequency (unified.graphml was left as it was)")
    files = _write_unified(run_dir, U)
    echo(f"unified {len(graphs)} graphs: {U.number_of_nodes()} nodes, {U.number_of_edges()} edges")
    for f in files:
        echo(f"  wrote {f}")
    return {"graphs": len(graphs), "nodes": U.number_of_nodes(), "edges": U.number_of_edges(), "files": files}


def _intervene(run_dir, manifest, remote, what, max_prompts_per_edge, max_rows, seed, cache_dir, echo) -> dict:
    from interpkit.analyses.attention_tracing.interventions import CircuitConfig, edge_interventions, signal_removal

    if what not in ("edge", "input"):
        raise UserError(f"--what {what!r}; use edge (upstream signal per edge) or input (full signal removal)")
    c = manifest["config"]
    lm, prompts, omega = _load_run_model(manifest, remote, cache_dir)
    t0 = time.perf_counter()
    if what == "input":
        df = signal_removal(lm, omega, prompts, _load_records(run_dir), share=c["signal_share"], seed=seed,
                            max_rows=max_rows, decimals=c.get("signal_decimals"))
        out = run_dir / "signal_removal.csv"
    else:
        U = gr.read_graphml(run_dir / "unified.graphml") if (run_dir / "unified.graphml").exists() \
            else gr.unify(list(_load_graphs(run_dir).values()), list(_load_graphs(run_dir)))
        cfg = CircuitConfig(signal_share=c["signal_share"], max_prompts_per_edge=max_prompts_per_edge,
                            max_rows=max_rows, seed=seed, signal_decimals=c.get("signal_decimals"))
        df = edge_interventions(lm, omega, prompts, _load_graphs(run_dir), U, cfg)
        out = run_dir / "interventions.csv"
    omega.save()
    df.to_csv(out, index=False)
    table = df.groupby("mode")[["d_attn", "d_logit_diff"]].agg(["mean", "median"]) if len(df) else None
    echo(f"{len(df)} interventions in {time.perf_counter() - t0:.2f} s -> {out}")
    if table is not None:
        echo(table.round(4).to_string())
    return {"rows": len(df), "file": str(out),
            "by_mode": {} if table is None else json.loads(table.to_json(orient="index"))}


def _prune(run_dir: Path, min_prompts: int, min_effect: float, echo) -> dict:
    import pandas as pd

    path = run_dir / "interventions.csv"
    if not path.exists():
        raise UserError(f"{path} is missing; run interpkit circuit intervene --run {run_dir} first")
    U = gr.read_graphml(run_dir / "unified.graphml")
    C = gr.prune_circuit(U, pd.read_csv(path), min_prompts=min_prompts, min_effect=min_effect)
    files = _write_unified(run_dir, C, name="circuit")
    heads = sorted(gr.circuit_components(C))
    passed = sum(1 for _, _, key in C.edges(keys=True) if key != "logit")     # root (logit) edges are always kept
    echo(f"circuit (>= {min_prompts} prompts, |mean delta logit diff| >= {min_effect}): "
         f"{passed} intervened edges passed, {C.number_of_edges() - passed} root edges kept; "
         f"{C.number_of_nodes()} nodes, heads {' '.join(f'{l}.{h}' for l, h in heads) or 'none'}")
    for f in files:
        echo(f"  wrote {f}")
    return {"nodes": C.number_of_nodes(), "edges": C.number_of_edges(), "passed_edges": passed, "heads": heads,
            "files": files}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _load_run_model(manifest: dict, remote, cache_dir):
    """(LoadedModel, PromptSet, Omega) of an attn-trace run, with the run's centring and Omega cache."""
    from interpkit.analyses.attention_tracing.omega import Omega, default_cache_dir
    from interpkit.models import load_model
    from interpkit.tasks import get_task

    c = manifest["config"]
    model = manifest["model"]["name"]
    lm = load_model(model, remote=remote)
    _needs_local_weights(lm)
    prompts = get_task(c["task"])(lm.tokenizer, n=c["n_prompts"], seed=c["seed"])
    used = manifest.get("omega_cache")
    cache_dir = cache_dir or (str(Path(used).parent) if used and used != "None" else default_cache_dir())
    # runs from before centring existed were traced uncentred (the manifest has no "center")
    omega = Omega(lm.arch, model, lm.revision, cache_dir=cache_dir, center=c.get("center", False))
    return lm, prompts, omega


def _references(manifest: dict, reference: str | None) -> list[str]:
    from interpkit.analyses.attention_tracing.reference_circuits import TASK_REFERENCES

    if reference:
        return [r.strip() for r in reference.split(",") if r.strip()]
    refs = TASK_REFERENCES.get(manifest["config"]["task"])
    if not refs:
        raise UserError(f"no reference circuit ships for task {manifest['config']['task']!r}; pass --reference "
                        f"(a name or a file with one 'layer.head' per line)")
    return refs


def _compare(run_dir: Path, manifest: dict, reference: str | None, include_mlp: bool | None, echo) -> dict:
    from interpkit.analyses.attention_tracing.reference_circuits import INCLUDE_MLP, reference_components
    from interpkit.analyses.attention_tracing.studies import plot_compare

    path = run_dir / "circuit.graphml"
    if not path.exists():
        raise UserError(f"{path} is missing; run interpkit circuit prune --run {run_dir} first")
    C = gr.read_graphml(path)
    all_scores = {}
    for ref in _references(manifest, reference):
        mlp = INCLUDE_MLP.get(ref, False) if include_mlp is None else include_mlp
        scores = gr.compare(gr.circuit_components(C, include_mlp=mlp), reference_components(ref, mlp))
        all_scores[ref] = {**scores, "include_mlp": mlp}
        echo(f"vs {ref}{' (with MLPs)' if mlp else ''}: precision {scores['precision']:.3f}, recall "
             f"{scores['recall']:.3f}, F1 {scores['f1']:.3f} ({scores['tp']} shared, {scores['fp']} extra, "
             f"{scores['fn']} missed)")
    first = next(iter(all_scores))
    (run_dir / "compare.json").write_text(json.dumps({"reference": first, **all_scores[first],
                                                      "all": all_scores}, indent=2))
    png = run_dir / "compare.png"
    plot_compare(all_scores, png, title=f"{manifest['config']['task']}: "
                       f"{manifest['model']['name']} circuit vs references")
    echo(f"  wrote {run_dir / 'compare.json'}\n  wrote {png}")
    return {**all_scores[first], "all": all_scores, "files": [str(run_dir / "compare.json"), str(png)]}


def _sweep(run_dir, manifest, remote, min_prompts, thresholds, reference, include_mlp, cache_dir, max_prompts,
           echo) -> dict:
    import pandas as pd

    from interpkit.analyses.attention_tracing.reference_circuits import INCLUDE_MLP, reference_components
    from interpkit.analyses.attention_tracing.studies import plot_sweep, threshold_sweep

    path = run_dir / "interventions.csv"
    if not path.exists():
        raise UserError(f"{path} is missing; run interpkit circuit intervene --run {run_dir} first")
    thresholds = thresholds if thresholds is not None else [round(0.05 * i, 2) for i in range(21)]
    if any(t < 0 for t in thresholds):
        raise UserError("thresholds must be >= 0 (|mean delta logit diff| in logit units)")
    lm, prompts, _ = _load_run_model(manifest, remote, cache_dir)
    graphs = _load_graphs(run_dir)
    pids = sorted(graphs)[:max_prompts]
    sub = prompts.subset(pids)
    ref, mlp = None, False
    if reference or manifest["config"]["task"] in ("ioi", "gt", "gp"):
        name = _references(manifest, reference)[0]
        mlp = INCLUDE_MLP.get(name, False) if include_mlp is None else include_mlp
        ref = reference_components(name, mlp)
    U = gr.read_graphml(run_dir / "unified.graphml")
    with stage("ablation forwards", len(thresholds) + 2) as st:
        df = threshold_sweep(lm, sub, U, pd.read_csv(path), thresholds, min_prompts, reference=ref,
                             include_mlp=mlp, progress=st.advance)
    df.to_csv(run_dir / "sweep.csv", index=False)
    png = run_dir / "sweep.png"
    plot_sweep(df, png, title=f"{manifest['config']['task']} on {manifest['model']['name']}: "
                     f"edges seen in >= {min_prompts} prompts; faithfulness on {len(pids)} traced prompts")
    cols = ["threshold", "heads", "edges", "faithfulness", "ratio"] + (["precision", "recall", "f1"] if ref else [])
    echo(f"model logit diff {df.attrs['model_logit_diff']:.3f}, all heads ablated {df.attrs['ablated_logit_diff']:.3f}")
    echo(df[cols].round(3).to_string(index=False))
    echo(f"  wrote {run_dir / 'sweep.csv'}\n  wrote {png}")
    return {"rows": df[cols].to_dict("records"), "files": [str(run_dir / "sweep.csv"), str(png)],
            "model_logit_diff": df.attrs["model_logit_diff"], "ablated_logit_diff": df.attrs["ablated_logit_diff"]}


def _sparsity(run_dir: Path, manifest: dict, echo) -> dict:
    from interpkit.analyses.attention_tracing.studies import plot_sparsity, sparsity_table

    recs = _load_records(run_dir)
    if not recs:
        raise UserError(f"{run_dir} has no traced edges")
    t = sparsity_table(recs)
    t.to_csv(run_dir / "sparsity.csv", index=False)
    png = run_dir / "sparsity.png"
    plot_sparsity(recs, png)
    out = {}
    for side, name in (("q", "query"), ("k", "key")):
        r = [x for x in recs if x["side"] == side and x["n_selected"] > 0]
        if r:
            used = np.array([x["n_selected"] for x in r])
            rank = r[0]["rank"]
            out[side] = {"edges": len(r), "mean": float(used.mean()), "median": float(np.median(used)),
                         "rank": rank, "at_most_quarter_rank": float((used <= rank / 4).mean())}
            echo(f"{name} side: {len(r)} edges, components used mean {used.mean():.2f} / median "
                 f"{np.median(used):.0f} of rank {rank}; {100 * out[side]['at_most_quarter_rank']:.1f}% use <= "
                 f"a quarter of the rank")
    echo(f"  wrote {run_dir / 'sparsity.csv'}\n  wrote {png}")
    return {**out, "files": [str(run_dir / "sparsity.csv"), str(png)]}


def _control(run_dir, manifest, remote, attn_thresh, similarity, cluster_threshold, default_src, max_prompts,
             cache_dir, echo) -> dict:
    from interpkit.analyses.attention_tracing.studies import cluster_signals, control_heads, firing_signals, plot_control

    if not 0 < attn_thresh <= 1 or not 0 < similarity <= 2 or not 0 < cluster_threshold <= 2:
        raise UserError("--attn-thresh must be in (0, 1], --similarity and --cluster-threshold in (0, 2]")
    c = manifest["config"]
    lm, prompts, omega = _load_run_model(manifest, remote, cache_dir)
    pids = sorted(_load_graphs(run_dir))[:max_prompts]
    with stage("firing signals (prompts)", len(pids)) as st:
        firings, vecs = firing_signals(lm, omega, prompts, pids, attn_thresh, c["signal_share"],
                                       c.get("signal_decimals"), progress=st.advance)
    omega.save()
    if not len(firings):
        raise UserError(f"no head attends with >= {attn_thresh}; lower --attn-thresh")
    heads, _ = control_heads(firings, vecs, (default_src,), similarity)
    cl = cluster_signals(firings, vecs, (default_src,), cluster_threshold)
    heads.to_csv(run_dir / "control_heads.csv", index=False)
    firings.to_csv(run_dir / "firings.csv", index=False)
    ctrl = heads[heads.controlled]
    summary = {"firings": int(len(firings)), "key_side_firings": int(len(cl["index"])),
               "default_firings": int((firings.side.eq("k") & firings.src.eq(default_src)).sum()),
               "heads_with_default_firings": int(len(heads)), "controlled_heads": [(int(r.layer), int(r.head))
                                                                                  for r in ctrl.itertuples()],
               "clusters": int(cl["labels"].max()) + 1 if len(cl["labels"]) else 0,
               "largest_cluster": {k: cl[k] for k in ("tp", "fp", "fn", "tn", "precision", "recall")},
               "largest_cluster_sources": cl["src_counts"][0] if cl["src_counts"] else {},
               "ip_default_mean": float(np.mean(cl["ip_default"])) if len(cl["ip_default"]) else None,
               "ip_other_mean": float(np.mean(cl["ip_other"])) if len(cl["ip_other"]) else None}
    (run_dir / "control.json").write_text(json.dumps(summary, indent=2, default=float))
    png = run_dir / "control.png"
    plot_control(heads, cl, vecs, lm.arch.n_layers, lm.arch.n_heads, png, similarity)
    echo(f"{summary['firings']} firings (attention >= {attn_thresh}) in {len(pids)} prompts; key side "
         f"{summary['key_side_firings']}, on position {default_src}: {summary['default_firings']}")
    echo(f"controlled heads (default-token signals within mean cosine distance {similarity}): "
         f"{len(ctrl)}/{len(heads)}: {' '.join(f'{l}.{h}' for l, h in summary['controlled_heads']) or '-'}")
    lc = summary["largest_cluster"]
    echo(f"{summary['clusters']} clusters at distance {cluster_threshold}; largest as a detector of position-"
         f"{default_src} firings: precision {lc['precision']:.3f}, recall {lc['recall']:.3f}; mean inner product "
         f"with its prototype: default-token firings {_fmt(summary['ip_default_mean'])}, other "
         f"{_fmt(summary['ip_other_mean'])}")
    echo(f"  wrote {run_dir / 'control_heads.csv'}\n  wrote {run_dir / 'control.json'}\n  wrote {png}")
    return {**summary, "files": [str(run_dir / "control_heads.csv"), str(run_dir / "control.json"), str(png)]}
