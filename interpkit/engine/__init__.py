"""The sweep engine: every patching-like analysis is a planner on it.

- ``plan``: turns a sweep (which rows write which source activations where) into typed chunks, dropping
  work that provably cannot change the result: cells before the first token where base and source
  differ, writes at the last layer away from the last token, the prefix and lower layers a write cannot
  reach (rerun on top of the base run's key/value cache).
- ``inside``: the torch-only code that runs inside nnsight traces; the only engine code that travels to NDIF.
- ``run``: executes a plan locally (chunk by chunk, with progress and resumable storage) or remotely (the
  whole sweep as one ``model.session``, one NDIF request, the base run's cache never leaving the server).
"""
