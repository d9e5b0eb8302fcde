"""ROME causal tracing: facts, noise, the restoration planners (batched and prefix) on the sweep engine, the cached known-fact filter, plots, `interpkit causal-trace`."""
