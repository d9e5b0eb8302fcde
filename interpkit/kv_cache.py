"""Key/value-cache helpers for engines that rerun only a suffix of a prompt on top of a cached prefix.

The sweep engine's suffix runs (``interpkit.engine``: patching, causal tracing) record a reference
run's cache once and hand every later forward the first ``p`` positions of some of its rows.
"""
from __future__ import annotations

import torch


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Left-padding-aware position ids (a padded row's first real token is position 0), as nnsight uses."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def layer_kv(cache, layer: int):
    """(keys, values) of one layer of an HF cache, in transformers 5 (``layers``) or 4 (``key_cache``) form."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def prefix_cache(config, kv: list, p: int, rows: torch.Tensor, skipped: int = 0):
    """A fresh DynamicCache holding the first ``p`` positions of ``kv`` (per layer (keys, values)) for the
    reference rows ``rows`` (one entry per row of the new batch). The first ``skipped`` layers do not run
    (their cache is only measured, for positions and masks): they get views of the right shape, not copies."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:
        cache = DynamicCache()
    n = rows.shape[0]
    for layer, (k, v) in enumerate(kv):
        if layer < skipped:
            k, v = k[:1, :, :p].expand(n, -1, -1, -1), v[:1, :, :p].expand(n, -1, -1, -1)
        else:
            k, v = k[rows, :, :p], v[rows, :, :p]
        if hasattr(cache, "layers"):                # transformers 5: set the layer, no concatenation copy
            cache.update(k[:, :, :0], v[:, :, :0], layer)
            cache.layers[layer].keys, cache.layers[layer].values = k, v
        else:
            cache.update(k, v, layer)
    return cache
