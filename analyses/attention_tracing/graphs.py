"""Attention-causal graphs: nodes, per-prompt build, unification, pruning, export, comparison, plot.

Node ids are plain strings (no tuples to ``eval`` back); the structure lives in node attributes:
``kind`` (head | mlp | attn_bias | embed | root), ``layer`` (-1 for the embedding; n_layers for the root),
``head`` (-1 if not a head), ``dest_role`` (the position the component writes to / the head reads from),
``src_role`` (the source token a head moves; "" otherwise; "later" for a head's pieces from tokens after
the edge's source, which only reach the competing positions). Per-prompt graphs also carry ``dest_pos``
and ``src_pos`` (positions without left padding). Edges of a ``MultiDiGraph`` are keyed by ``side``:
"q" (through the downstream head's query), "k" (its key) or "logit" (into the root), with ``weight`` =
the contribution in score (or logit) units.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import networkx as nx

from interpkit.plots import finish, pyplot

NODE_IDS = {"head": "L{layer}H{head}|{dest}|{src}", "mlp": "MLP{layer}|{dest}", "attn_bias": "BIAS{layer}|{dest}",
            "embed": "EMB|{dest}", "root": "LOGITS|{dest}"}     # node kinds and the format of their ids


def node(kind: str, layer: int = -1, head: int = -1, dest: str = "", src: str = "",
         dest_pos: int = -1, src_pos: int = -1) -> tuple[str, dict]:
    """(id, attributes) of a graph node."""
    if kind not in NODE_IDS:
        raise ValueError(f"unknown node kind {kind!r}")
    nid = NODE_IDS[kind].format(layer=layer, head=head, dest=dest, src=src)
    return nid, dict(kind=kind, layer=int(layer), head=int(head), dest_role=dest, src_role=src,
                     dest_pos=int(dest_pos), src_pos=int(src_pos))


def add_edge(G: nx.MultiDiGraph, up: tuple[str, dict], down: tuple[str, dict], side: str, weight: float) -> None:
    """Add (or accumulate onto) the edge up -> down through ``side``."""
    for nid, attrs in (up, down):
        if nid not in G:
            G.add_node(nid, **attrs)
    if G.has_edge(up[0], down[0], key=side):
        G.edges[up[0], down[0], side]["weight"] += float(weight)
    else:
        G.add_edge(up[0], down[0], key=side, side=side, weight=float(weight))


def root_of(G: nx.MultiDiGraph) -> str | None:
    return next((n for n, k in G.nodes(data="kind") if k == "root"), None)


# -- unification and pruning -----------------------------------------------------------------------
def unify(graphs: list[nx.MultiDiGraph], prompt_ids: list[int] | None = None) -> nx.MultiDiGraph:
    """Union of per-prompt graphs: edge weight = sum / number of graphs; ``n_prompts`` and ``prompts``.

    ``prompts`` is a comma-separated string of prompt ids (GraphML has no lists); nodes get
    ``n_prompts`` and ``frequency`` (share of traced prompts they appear in).
    """
    prompt_ids = list(range(len(graphs))) if prompt_ids is None else list(prompt_ids)
    U = nx.MultiDiGraph(n_graphs=len(graphs))
    seen_nodes: dict[str, list[int]] = defaultdict(list)
    seen_edges: dict[tuple, list[int]] = defaultdict(list)
    weights: dict[tuple, float] = defaultdict(float)
    for pid, G in zip(prompt_ids, graphs):
        for n, attrs in G.nodes(data=True):
            if n not in U:
                U.add_node(n, **{k: v for k, v in attrs.items() if k not in ("dest_pos", "src_pos")})
            seen_nodes[n].append(pid)
        for u, v, key, w in G.edges(keys=True, data="weight"):
            seen_edges[(u, v, key)].append(pid)
            weights[(u, v, key)] += w
    for n, pids in seen_nodes.items():
        U.nodes[n].update(n_prompts=len(pids), frequency=len(pids) / max(1, len(graphs)))
    for (u, v, key), pids in seen_edges.items():
        U.add_edge(u, v, key=key, side=key, weight=weights[(u, v, key)] / max(1, len(graphs)),
                   n_prompts=len(pids), prompts=",".join(map(str, pids)))
    return U


def edge_prompts(U: nx.MultiDiGraph, u: str, v: str, key: str) -> list[int]:
    s = U.edges[u, v, key].get("prompts", "")
    return [int(x) for x in s.split(",") if x != ""]


def prune_by_frequency(U: nx.MultiDiGraph, min_frequency: float) -> nx.MultiDiGraph:
    """Keep nodes seen in at least ``min_frequency`` of the traced prompts (and drop isolated ones)."""
    P = U.copy()
    rare = [n for n, a in U.nodes(data=True) if a.get("frequency", 0) < min_frequency and a["kind"] != "root"]
    P.remove_nodes_from(rare)
    P.remove_nodes_from([n for n in list(P) if P.degree(n) == 0])
    return P


def prune_circuit(U: nx.MultiDiGraph, effects, min_prompts: int, min_effect: float,
                  mode: str = "remove") -> nx.MultiDiGraph:
    """The circuit: edges seen in >= ``min_prompts`` prompts whose mean |delta logit diff| when their
    signal is removed is >= ``min_effect`` (logit units); root edges are kept; then only the weakly
    connected component of the root remains. ``effects``: DataFrame from ``interventions.edge_interventions``.

    Adds ``avg_logit_diff`` / ``abs_avg_logit_diff`` / ``avg_attn_diff`` to kept edges and ``norm_weight``
    (weight divided by the total weight into the same node through the same side).
    """
    C = U.copy()
    eff = effects[effects["mode"] == mode].groupby(["up", "down", "side"])[["d_logit_diff", "d_attn"]].mean()
    for u, v, key, data in list(C.edges(keys=True, data=True)):
        if key == "logit":
            continue
        if data.get("n_prompts", 0) < min_prompts or (u, v, key) not in eff.index:
            C.remove_edge(u, v, key)
            continue
        ld, da = eff.loc[(u, v, key)]
        if not abs(ld) >= min_effect:
            C.remove_edge(u, v, key)
            continue
        data.update(avg_logit_diff=float(ld), abs_avg_logit_diff=float(abs(ld)), avg_attn_diff=float(da))
    root = root_of(C)
    if root is not None:
        keep = nx.node_connected_component(C.to_undirected(as_view=True), root)
        C.remove_nodes_from([n for n in list(C) if n not in keep])
    totals: dict[tuple, float] = defaultdict(float)
    for u, v, key, w in C.edges(keys=True, data="weight"):
        totals[(v, key)] += abs(w)
    for u, v, key, data in C.edges(keys=True, data=True):
        data["norm_weight"] = abs(data["weight"]) / totals[(v, key)] if totals[(v, key)] else 0.0
    return C


# -- comparison -------------------------------------------------------------------------------------
def circuit_components(G: nx.MultiDiGraph, include_mlp: bool = False) -> set:
    """Node-level set of (layer, head) — plus (layer, "MLP") if asked; biases/embedding/root excluded."""
    out = set()
    for _, a in G.nodes(data=True):
        if a["kind"] == "head":
            out.add((int(a["layer"]), int(a["head"])))
        elif include_mlp and a["kind"] == "mlp":
            out.add((int(a["layer"]), "MLP"))
    return out


def compare(ours: set, reference: set) -> dict:
    """Precision, recall and F1 of a set of components against a reference set."""
    tp = len(ours & reference)
    precision = tp / len(ours) if ours else 0.0
    recall = tp / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": len(ours - reference),
            "fn": len(reference - ours), "n_ours": len(ours), "n_reference": len(reference)}


# -- export ------------------------------------------------------------------------------------------
def write_graphml(G: nx.MultiDiGraph, path: str | Path) -> Path:
    path = Path(path)
    nx.write_graphml(G, path)
    return path


def read_graphml(path: str | Path) -> nx.MultiDiGraph:
    """Read a graph written by ``write_graphml`` (types restored from the GraphML key declarations)."""
    G = nx.read_graphml(path, force_multigraph=True)
    if not isinstance(G, nx.MultiDiGraph):
        G = nx.MultiDiGraph(G)
    for k in ("node_default", "edge_default"):
        G.graph.pop(k, None)
    return G


def write_cytoscape(G: nx.MultiDiGraph, path: str | Path) -> Path:
    """Cytoscape.js JSON (``elements.nodes`` / ``elements.edges``), readable by Cytoscape desktop."""
    path = Path(path)
    data = nx.cytoscape_data(G)
    path.write_text(json.dumps(data, indent=1, default=float))
    return path


def read_cytoscape(path: str | Path) -> nx.MultiDiGraph:
    G = nx.cytoscape_graph(json.loads(Path(path).read_text()))
    G = G if isinstance(G, nx.MultiDiGraph) else nx.MultiDiGraph(G)
    for _, a in G.nodes(data=True):                   # bookkeeping fields Cytoscape JSON adds
        for k in ("id", "value", "name"):
            a.pop(k, None)
    for *_, a in G.edges(data=True):
        for k in ("source", "target", "key"):
            a.pop(k, None)
    return G


def plot_circuit(G: nx.MultiDiGraph, path: str | Path, title: str = "") -> Path:
    """Layered drawing: x = layer, nodes of a layer stacked; q edges blue, k edges red, logit edges grey."""
    plt = pyplot()
    by_layer: dict[int, list[str]] = defaultdict(list)
    for n, a in sorted(G.nodes(data=True), key=lambda x: (x[1]["layer"], x[1]["head"], x[0])):
        by_layer[int(a["layer"])].append(n)
    pos = {n: (layer, -i) for layer, ns in by_layer.items() for i, n in enumerate(ns)}
    height = max([len(v) for v in by_layer.values()] + [1])
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(by_layer), 1 + 0.45 * height))
    colors = {"q": "tab:blue", "k": "tab:red", "logit": "0.5"}
    wmax = max([abs(w) for *_, w in G.edges(data="weight")] + [1e-12])
    for u, v, key, w in G.edges(keys=True, data="weight"):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color=colors.get(key, "k"), alpha=0.7,
                                    lw=0.5 + 2.5 * abs(w) / wmax, connectionstyle="arc3,rad=0.08"))
    for n, (x, y) in pos.items():
        ax.text(x, y, n.replace("|", "\n", 1), ha="center", va="center", fontsize=6,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.4", lw=0.5))
    ax.set_xlim(min(by_layer) - 0.7 if by_layer else -1, max(by_layer) + 0.7 if by_layer else 1)
    ax.set_ylim(-height, 1)
    ax.set_xlabel("layer (-1 = embedding)")
    ax.set_yticks([])
    ax.set_title(title or f"{G.number_of_nodes()} nodes, {G.number_of_edges()} edges (blue: query, red: key)")
    path = Path(path)
    finish(fig, path, dpi=130)
    return path
