"""CLI bodies of ``interpkit sae train | load | cluster``."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path


from interpkit.analyses.sae.load import SAE, SAESpec, describe, load_sae, sae_layer, save_sae
from interpkit.analyses.sae.train import Activations, SAETrainConfig, build_corpus, collect, sae_stats, train_sae
from interpkit.errors import UserError


def _hook_name(layer: int, n_layers: int) -> str:
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _save_acts(path: Path, a: Activations) -> None:
    from safetensors.torch import save_file

    save_file({"acts": a.acts.contiguous(), "token_ids": a.token_ids, "doc": a.doc, "pos": a.pos}, str(path))


def _load_acts(path: Path) -> Activations:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return Activations(t["acts"], t["token_ids"], t["doc"], t["pos"])


def activations_for(lm, layer: int, corpus: str, folder: Path, cfg: SAETrainConfig, progress: bool) -> Activations:
    """Cached activations of the run (computed once; a resumed run reuses them)."""
    import json

    path = folder / "activations.safetensors"
    if path.exists():
        return _load_acts(path)
    docs = build_corpus(corpus, lm, n_generated=cfg.generated_docs, max_tokens=cfg.max_tokens, seed=cfg.seed)
    docs = docs[:cfg.max_docs]
    (folder / "corpus.json").write_text(json.dumps(docs))
    acts = collect(lm, docs, layer, cfg.max_tokens, progress=progress)
    _save_acts(path, acts)
    return acts


def sae_train_command(model: str, cfg: SAETrainConfig, *, root: str = "artifacts", progress: bool = True,
                      lm=None, echo=print) -> dict:
    """Train an SAE on ``model``'s residual at ``cfg.layer``; writes the run dir with ``sae/`` inside."""
    from interpkit.models import load_model
    from interpkit.store import RunStore

    lm = lm or load_model(model)
    cfg.validate(lm.arch.n_layers)
    store = RunStore("sae", asdict(cfg), model=model, seed=cfg.seed, root=root)
    acts = activations_for(lm, cfg.layer, cfg.corpus, store.dir, cfg, progress)
    test = acts.doc % 10 == 0                                     # every 10th document held out
    X, Xte = acts.acts[~test], acts.acts[test]
    if len(X) < cfg.batch_size:
        raise UserError(f"only {len(X)} training tokens for batch size {cfg.batch_size}; use a bigger corpus")
    spec = SAESpec(d_in=X.shape[1], d_sae=cfg.width, architecture=cfg.architecture,
                   k=cfg.k if cfg.architecture == "topk" else None, hook_name=_hook_name(cfg.layer, lm.arch.n_layers),
                   hook_layer=cfg.layer, model_name=model, extra={"train": asdict(cfg)})
    sae, history = train_sae(X, cfg, spec, folder=store.dir, progress=progress)
    save_sae(sae, store.dir / "sae")
    tr, te = sae_stats(sae, X), sae_stats(sae, Xte if len(Xte) else X)
    summary = {"n_train_tokens": len(X), "n_test_tokens": len(Xte), "train": asdict(tr), "test": asdict(te),
               "sae": str(store.dir / "sae"), "history": history}
    store.finish(**{k: v for k, v in summary.items() if k != "history"})
    echo(f"SAE {cfg.architecture} width {cfg.width} on {model} residual {cfg.layer}: {len(X)} train tokens")
    echo(f"  held-out: MSE {te.mse:.4g}, FVU {te.fvu:.3f}, L0 {te.l0:.1f}, dead {te.dead:.2f}")
    echo(f"saved (sae_lens layout): {store.dir / 'sae'}")
    return summary


def resolve_sae(path: str) -> tuple[SAE, Path]:
    p = Path(path)
    if (p / "sae" / "cfg.json").exists():
        p = p / "sae"
    return load_sae(p), p


def sae_load_command(path: str, echo=print) -> SAE:
    """Load and describe an SAE folder in the sae_lens layout."""
    sae, p = resolve_sae(path)
    d = describe(sae)
    echo(f"{p}: {d['architecture']} SAE, d_in {d['d_in']}, d_sae {d['d_sae']}"
         + (f", k {d['k']}" if d["k"] else "") + f", hook {d['hook_name'] or '?'}, model {d['model_name'] or '?'}")
    return sae


def sae_cluster_command(path: str, *, model: str | None = None, method: str = "spectral", n_clusters: int = 64,
                        cutoff: float = 0.5, top_k: int | None = 2, corpus: str = "calendar+tasks",
                        layer: int | None = None, seed: int = 0, max_clusters: int = 40, root: str = "artifacts",
                        progress: bool = True, lm=None, echo=print) -> dict:
    """Cluster an SAE's decoder directions; reconstructions, irreducibility, circle search, figures."""
    import pandas as pd

    from interpkit.analyses.sae.cluster import (circle_fit, graph_clusters, labels_to_clusters, mean_pairwise_cosine,
                                      reconstruct, spectral_clusters, value_labels)
    from interpkit.analyses.sae.plots import plot_cluster
    from interpkit.models import load_model
    from interpkit.store import RunStore

    if method not in ("spectral", "graph"):
        raise UserError(f"method {method!r}: use spectral or graph")
    sae, folder = resolve_sae(path)
    model = model or sae.spec.model_name
    if not model:
        raise UserError("the SAE's cfg.json names no model; pass --model")
    run_acts = folder.parent / "activations.safetensors"
    store = RunStore("sae_cluster", {"sae": str(folder.resolve()), "method": method, "n_clusters": n_clusters,
                                     "cutoff": cutoff, "top_k": top_k, "corpus": corpus, "seed": seed},
                     model=model, seed=seed, root=root)
    lm = lm or load_model(model)
    if run_acts.exists() and layer is None:
        acts = _load_acts(run_acts)
    else:
        layer = sae_layer(sae, lm.arch.n_layers) if layer is None else layer
        acts = activations_for(lm, layer, corpus, store.dir, SAETrainConfig(layer=layer, seed=seed), progress)
    if acts.acts.shape[1] != sae.spec.d_in:
        raise UserError(f"activations have width {acts.acts.shape[1]} but the SAE expects {sae.spec.d_in}")
    W = sae.W_dec.detach()
    if method == "spectral":
        clusters = labels_to_clusters(spectral_clusters(W, min(n_clusters, W.shape[0]), seed))
    else:
        clusters = graph_clusters(W, cutoff, top_k)
    tokens = lm.tokenizer.convert_ids_to_tokens(acts.token_ids.tolist())
    values = value_labels(tokens)
    rows = []
    for c_id, cl in enumerate(clusters[:max_clusters]):
        rec = reconstruct(sae, acts.acts, cl, indices=True, seed=seed)
        row = {"cluster": c_id, "size": len(cl), "latents": cl, "mean_cos": mean_pairwise_cosine(W, cl),
               "n_tokens": 0 if rec is None else len(rec.rows)}
        if rec is not None:
            row.update(mixture_pc12=rec.mixture[0] if rec.mixture else float("nan"),
                       separability_pc12=rec.separability[0] if rec.separability else float("nan"))
            for kind, period in (("days", 7), ("months", 12)):
                fit = circle_fit(rec.recon, values[kind][rec.rows], period)
                if fit is not None:
                    row.update({f"{kind}_r2": fit["r2"], f"{kind}_r2_heldout": fit["r2_heldout"], f"{kind}_n": fit["n"]})
        rows.append((row, rec))
    df = pd.DataFrame([r for r, _ in rows])
    df.to_csv(store.dir / "clusters.csv", index=False)
    figures = []
    ranked = _interesting(df)
    for c_id in ranked[:6]:
        row, rec = rows[c_id]
        if rec is None:
            continue
        name = f"cluster_{c_id}.png"
        plot_cluster(rec, [tokens[i] for i in rec.rows.tolist()], values, store.dir / name,
                     title=f"cluster {c_id} ({row['size']} latents, {row['n_tokens']} tokens)")
        figures.append(name)
    best = _best_circle(df)
    store.finish(n_clusters_found=len(clusters), figures=figures, best_circle=best)
    echo(f"{len(clusters)} clusters ({method}); reconstructions of the first {len(rows)}; figures: {', '.join(figures)}")
    cols = [c for c in ("cluster", "size", "n_tokens", "mean_cos", "mixture_pc12", "separability_pc12",
                        "days_r2_heldout", "months_r2_heldout") if c in df]
    echo(df.loc[ranked[:10], cols].to_string(index=False))
    echo(f"best circle cluster: {best}")
    echo(f"results: {store.dir}")
    return {"clusters": clusters, "table": df, "best_circle": best, "dir": store.dir}


def _interesting(df) -> list[int]:
    """Cluster ids: best held-out circle fits first, then the clusters firing on most tokens."""
    score = df.get("days_r2_heldout", pd_nan(df)).fillna(-9).combine(df.get("months_r2_heldout", pd_nan(df)).fillna(-9), max)
    order = sorted(range(len(df)), key=lambda i: (-score[i], -df["n_tokens"][i]))
    return order


def pd_nan(df):
    import pandas as pd

    return pd.Series([float("nan")] * len(df))


def _best_circle(df) -> dict | None:
    best = None
    for kind in ("days", "months"):
        col = f"{kind}_r2_heldout"
        if col in df and df[col].notna().any():
            i = int(df[col].idxmax())
            cand = {"kind": kind, "cluster": int(df["cluster"][i]), "r2": float(df[f"{kind}_r2"][i]),
                    "r2_heldout": float(df[col][i]), "size": int(df["size"][i])}
            if best is None or cand["r2_heldout"] > best["r2_heldout"]:
                best = cand
    return best
