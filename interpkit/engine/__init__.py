"""The sweep engine: every patching-like analysis is a planner on it (activation patching, exact and
prefix: ``analyses.patching.sweep``; causal tracing's restorations, batched and prefix:
``analyses.causal_tracing.trace`` / ``analyses.causal_tracing.prefix``; circle interventions and the
middle-of-circle sweep: ``analyses.circles.features``; edge interventions on attention-causal circuits:
``analyses.attention_tracing.interventions``).

- ``plan``: turns a sweep (which rows write which source activations where) into typed chunks, dropping
  work that provably cannot change the result: cells before the first token where base and source
  differ, writes at the last layer away from the last token, the prefix and lower layers a write cannot
  reach (rerun on top of the base run's key/value cache).
- ``inside``: the typed records planners produce (``Write``: one indexed write, the only row copy,
  optionally from other positions, from rows of a value table, or of a subspace component only;
  ``ScoreAdd``: sparse additions to single heads' pre-softmax attention scores; ``Noise``: per-row
  corruption of the embeddings; ``Readout``: a metric, the answer probability or candidate logits,
  optionally with recorded activations;
  ``Forward``: one full forward; ``Reference`` / ``Suffix`` / ``Sweep``: a reference run and the suffix
  runs on its cache) and the torch-only code that runs them inside nnsight traces; the only engine code
  that travels to NDIF.
- ``run``: executes forwards and sweeps locally (chunk by chunk, with progress and resumable storage) or
  remotely (all of them as one ``model.session``, one NDIF request, the reference's cache never leaving
  the server); ``run_plan`` runs a patching plan as a sweep.
"""
