"""Attention-causal communication (ACC) tracing: Omega-SVD signals, per-prompt circuit graphs, edge
interventions and circuits (Franco & Crovella 2025, "Pinpointing attention-causal communication in
language models", NeurIPS), on nnsight.

    from interpkit.analyses.attention_tracing import Omega, AttnTraceConfig, trace_prompts, unify, signal_removal
    result = trace_prompts(lm, prompts, AttnTraceConfig(task="ioi"))  # one nnsight trace per batch
    U = result.unified()                                              # networkx MultiDiGraph

Modules: ``omega`` (Omega per head, factored SVD, HDF5 cache), ``signals`` (singular-component
contributions to relative scores, minimal sets), ``decompose`` (the one activation trace; upstream
components), ``trace`` (work queue), ``graphs`` (build / unify / prune / export / compare / plot),
``interventions`` (edits of one head's query or key input), ``reference_circuits`` (published circuits:
IOI, Greater-Than, Gender-Pronoun on GPT-2), ``studies`` (sparse attention decomposition, control signals,
threshold sweep, P/R/F1 bars), ``faithfulness`` (head mean-ablation), ``remote_omega`` (Omega's SVD in
an NDIF session), ``reference`` (a loop implementation, for benchmarks and checks), ``commands`` (CLI).

Weights follow the paper's convention: W_Q/W_K centred over d_model for LayerNorm models
(``Omega(center=True)``, ``AttnTraceConfig.center``; ``--no-center`` keeps them uncentred).

Names are imported lazily: code running inside remote traces imports the submodules it needs, and this
package's ``__init__`` pulls in nothing that NDIF's import whitelist would refuse.
"""
from __future__ import annotations

_MODULES = {
    "omega": ("Omega", "default_cache_dir"),
    "signals": ("edge_signal", "minimal_set", "relative_scores"),
    "decompose": ("collect", "decompose", "contributions", "load_weights"),
    "trace": ("AttnTraceConfig", "AttnTraceResult", "trace_prompts", "trace_prompt"),
    "graphs": ("unify", "prune_circuit", "prune_by_frequency", "compare", "circuit_components", "write_graphml",
               "read_graphml", "write_cytoscape", "read_cytoscape", "plot_circuit"),
    "interventions": ("CircuitConfig", "Edit", "apply_edits", "edge_interventions", "signal_removal"),
    "reference_circuits": ("reference_heads", "IOI_GPT2_WANG2022", "reference_components", "GT_GPT2_HANNA2023",
                           "GP_GPT2_MATHWIN2023"),
    "studies": ("sparsity_table", "plot_sparsity", "firing_signals", "control_heads", "cluster_signals",
                "threshold_sweep", "plot_compare"),
    "remote_omega": ("omega_from_remote",),
    "commands": ("attn_trace_command", "circuit_command"),
}
_API = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
