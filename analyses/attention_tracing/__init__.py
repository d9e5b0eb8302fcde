"""Attention-causal communication (ACC) tracing: Omega-SVD signals, per-prompt circuit graphs, edge
interventions and circuits (Franco & Crovella 2025, "Pinpointing attention-causal communication in
language models", NeurIPS), on nnsight.

    from analyses.attention_tracing import Omega, TraceConfig, trace_prompts, unify, signal_removal
    result = trace_prompts(lm, prompts, TraceConfig(task="ioi"))      # one nnsight trace per batch
    U = result.unified()                                             # networkx MultiDiGraph

Modules: ``omega`` (Omega per head, factored SVD, HDF5 cache), ``signals`` (singular-component
contributions to relative scores, minimal sets), ``decompose`` (the one activation trace; upstream
components), ``trace`` (work queue), ``graphs`` (build / unify / prune / export / compare / plot),
``interventions`` (edits of one head's query or key input), ``reference_circuits`` (published circuits:
IOI, Greater-Than, Gender-Pronoun on GPT-2), ``studies`` (sparse attention decomposition, control signals,
threshold sweep, P/R/F1 bars), ``faithfulness`` (head mean-ablation), ``remote_omega`` (Omega's SVD in
an NDIF session), ``reference`` (a loop implementation, for benchmarks and checks), ``commands`` (CLI).

Weights follow the paper's convention: W_Q/W_K centred over d_model for LayerNorm models
(``Omega(center=True)``, ``TraceConfig.center``; ``--no-center`` keeps them uncentred).

Names are imported lazily: code running inside remote traces imports the submodules it needs, and this
package's ``__init__`` pulls in nothing that NDIF's import whitelist would refuse.
"""
from __future__ import annotations

_API = {
    "Omega": "omega", "default_cache_dir": "omega",
    "edge_signal": "signals", "minimal_set": "signals", "relative_scores": "signals",
    "collect": "decompose", "decompose": "decompose", "contributions": "decompose", "load_weights": "decompose",
    "TraceConfig": "trace", "TraceResult": "trace", "trace_prompts": "trace", "trace_prompt": "trace",
    "unify": "graphs", "prune_circuit": "graphs", "prune_by_frequency": "graphs", "compare": "graphs",
    "circuit_components": "graphs", "write_graphml": "graphs", "read_graphml": "graphs",
    "write_cytoscape": "graphs", "read_cytoscape": "graphs", "plot_circuit": "graphs",
    "CircuitConfig": "interventions", "Edit": "interventions", "apply_edits": "interventions",
    "edge_interventions": "interventions", "signal_removal": "interventions",
    "reference_heads": "reference_circuits", "IOI_GPT2_WANG2022": "reference_circuits",
    "reference_components": "reference_circuits", "GT_GPT2_HANNA2023": "reference_circuits",
    "GP_GPT2_MATHWIN2023": "reference_circuits",
    "sparsity_table": "studies", "plot_sparsity": "studies", "firing_signals": "studies",
    "control_heads": "studies", "cluster_signals": "studies", "threshold_sweep": "studies",
    "plot_compare": "studies", "omega_from_remote": "remote_omega",
    "attn_trace_command": "commands", "circuit_command": "commands",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
