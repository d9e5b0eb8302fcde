"""Causal tracing that skips the work a restoration cannot change (the default local engine).

A restoration of token t whose first write is at layer f leaves every activation at positions < t, and
every activation below layer f, equal to its corrupted sample's. So its rows need only tokens t.. and
layers f..; the rest comes from one reference forward (clean row + S corrupted rows) that also records
the key/value cache, the residual stream and the values the writes copy. On top of that:

* writes that cannot change the answer are dropped: before the subject (clean equals corrupted there)
  and at the last layer away from the last position (nothing reads them). A restoration left with no
  writes scores the corrupted probability; one whose only write is the last layer's residual at the last
  position scores the clean (or, held, the corrupted) probability;
* a hidden-state write at layer f - 1 becomes the rows' starting state, so a hidden restoration at layer
  l computes layers l + 1.. only;
* identical restorations (windows clipped at the ends of the model) are computed once.

Restorations are grouped into chunks by (position block, layer block); a chunk starting at position p0
and layer l0 is one forward over tokens p0.. with the corrupted samples' cache for the positions < p0 and
the layers < l0 skipped (``.skip`` with the starting state). ``blocks`` blocks per axis trade fewer
forwards against less skipped work (5, the default: on smollm2-135m's first 60 known facts, all five
kinds, 1.27x the minimal token-layers in 23 forwards per fact; 3 blocks: 1.51x in 17; 12: 1.07x in 83).
Results equal ``causal_tracing``'s batched engine to float tolerance (tested against the
plain-hook reference). Remotely, one chunk of facts is one session (one request): the reference's
activations and cache stay on the server and feed the chunk forwards there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from analyses.causal_noise import corrupt
from analyses.causal_tracing import _RESID, SITE_NAMES, noise_bank, restoration_writes
from interpkit.kv_cache import layer_kv, prefix_cache
from interpkit.metrics import sequence_prob
from interpkit.sites import site


@dataclass(repr=False)             # travels to NDIF: a generated __repr__ references _thread (not whitelisted)
class Chunk:
    """One forward: restorations ``items`` (indices into FactPlan.unique), S rows each, tokens p0..,
    layers l0.. ."""

    p0: int
    l0: int
    items: list[int]


@dataclass(repr=False)
class FactPlan:
    """How one fact's restorations are computed: ``source[r]`` is ("low",), ("high",) or ("unique", u)."""

    unique: list[tuple]             # normalised writes (layer, site, pos, held) of each distinct restoration
    source: list[tuple]
    chunks: list[Chunk]
    sites: list[int]                # sites the reference forward records (forward order)


def normalise(writes: tuple, n_tokens: int, n_layers: int, subject_first: int, n_read: int = 1) -> tuple:
    """The writes that can change the answer, sorted; "before the subject" and "last layer, before the
    ``n_read`` positions whose logits are read" writes are no-ops."""
    keep = {w for w in writes if w[2] >= subject_first and not (w[0] == n_layers - 1 and w[2] < n_tokens - n_read)}
    return tuple(sorted(keep))


def first_layer(writes: tuple) -> int:
    """The first layer a restoration's rows must compute: a residual write at layer l starts them at l + 1."""
    return min(lay + 1 if site_ == _RESID else lay for lay, site_, _, _ in writes)


def plan_fact(restorations: list, n_tokens: int, subject_first: int, n_layers: int, window: int, samples: int,
              max_rows: int, blocks: int, n_read: int = 1) -> FactPlan:
    """``n_read``: how many last positions' logits score the answer (a multi-token answer's length)."""
    unique: list[tuple] = []
    index: dict[tuple, int] = {}
    source = []
    for spec in restorations:
        w = normalise(restoration_writes(spec, window, n_layers), n_tokens, n_layers, subject_first, n_read)
        if not w:
            source.append(("low",))
        elif first_layer(w) == n_layers and n_read == 1:  # only h^(L-1) at the last position is written
            source.append(("low",) if w[0][3] else ("high",))
        else:
            if w not in index:
                index[w] = len(unique)
                unique.append(w)
            source.append(("unique", index[w]))
    starts_p = _starts(sorted({min(x[2] for x in w) for w in unique}), blocks)
    starts_l = _starts(sorted({first_layer(w) for w in unique}), blocks)
    groups: dict[tuple[int, int], list[int]] = {}
    for u, w in enumerate(unique):
        p0 = max(p for p in starts_p if p <= min(x[2] for x in w))
        l0 = max(l for l in starts_l if l <= first_layer(w))
        groups.setdefault((p0, l0), []).append(u)
    per = max(1, max_rows // samples)
    chunks = [Chunk(p0, l0, items[i:i + per]) for (p0, l0), items in sorted(groups.items())
              for i in range(0, len(items), per)]
    sites = sorted({x[1] for w in unique for x in w} | {_RESID})
    return FactPlan(unique, source, chunks, sites)


def _starts(values: list[int], blocks: int) -> list[int]:
    """Block starts: ``blocks`` contiguous groups of the sorted distinct ``values``."""
    if not values:
        return []
    size = -(-len(values) // max(1, min(blocks, len(values))))
    return values[::size]


# --------------------------------------------------------------------------------------------------
# traces (torch only inside)
# --------------------------------------------------------------------------------------------------
def trace_reference(model, ids: torch.Tensor, bank: torch.Tensor, sites_: list[int], n_layers: int,
                    answer: torch.Tensor, remote=False):
    """Clean row + S corrupted rows: answer probability per row, the answer id (saved), the recorded
    sites (``acts[layer * len(sites_) + i]``, all rows and positions) and the per-layer (keys, values),
    which stay in the session (on the server, remotely)."""
    B = bank.shape[0]
    inputs = {"input_ids": ids[None].expand(B, -1), "attention_mask": torch.ones(B, ids.shape[0], dtype=torch.long)}
    with model.trace(inputs, use_cache=True, logits_to_keep=answer.shape[0], remote=remote):
        e = model.embed.output
        model.embed.output = corrupt(e, bank.to(device=e.device, dtype=e.dtype))
        acts = list()
        for layer in range(n_layers):
            for site_ in sites_:
                acts.append(site(model, SITE_NAMES[site_], layer).detach().clone())
        out = model.output
        p, a = sequence_prob(out.logits, answer)
        p = p.detach().cpu().save()
        a = a.detach().cpu().save()
        kv = list()
        for layer in range(n_layers):
            kv.append(layer_kv(out.past_key_values, layer))
    return p, a, acts, kv


def trace_chunk(model, inputs: dict, cache, l0: int, start, noise, writes: list, answer: torch.Tensor,
                remote=False):
    """One chunk: tokens p0.. on the cached prefix, layers < l0 skipped with ``start`` (or, from layer 0,
    the subject noise added to the embeddings), then the chunk's writes; answer probability per row."""
    kw = {"past_key_values": cache, "use_cache": True} if cache is not None else {}
    with model.trace(inputs, logits_to_keep=answer.shape[0], remote=remote, **kw):
        if noise is not None:
            e = model.embed.output
            model.embed.output = corrupt(e, noise.to(device=e.device, dtype=e.dtype))
        for layer in range(l0):
            model.layers[layer].skip(start)
        for layer, site_, rows, pos, fill in writes:
            x = site(model, SITE_NAMES[site_], layer)
            x[rows, pos] = fill.to(device=x.device, dtype=x.dtype)
        p = sequence_prob(model.output.logits, answer)[0].detach().cpu().save()
    return p


# --------------------------------------------------------------------------------------------------
# one fact
# --------------------------------------------------------------------------------------------------
def chunk_args(plan: FactPlan, chunk: Chunk, ids: torch.Tensor, bank: torch.Tensor, acts: dict, kv: list,
               samples: int) -> dict:
    """The forward of one chunk: inputs, prefix cache, skipped layers and starting state, noise, writes.
    ``acts[site][layer]`` ([1 + S, T, d]) and ``kv`` come from the reference forward."""
    S, p0, l0, T = samples, chunk.p0, chunk.l0, len(ids)
    n = len(chunk.items)
    sample = torch.arange(1, S + 1).repeat(n)                      # reference row of each chunk row
    inputs = {"input_ids": ids[p0:][None].expand(n * S, -1),
              "attention_mask": torch.ones(n * S, T, dtype=torch.long),
              "position_ids": torch.arange(p0, T)[None].expand(n * S, -1)}
    per_site: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for i, u in enumerate(chunk.items):
        for lay, site_, pos, held in plan.unique[u]:
            per_site.setdefault((lay, site_), []).append((i, pos, int(held)))
    offsets = torch.arange(S)

    def rows_pos_src(entries):           # chunk rows, positions and reference rows (0 clean, 1 + s held)
        e = torch.tensor(entries)
        rows = (e[:, :1] * S + offsets).reshape(-1)
        return rows, e[:, 1].repeat_interleave(S), (e[:, 2:] * (offsets + 1)).reshape(-1)

    start = acts[_RESID][l0 - 1][sample, p0:].clone() if l0 > 0 else None
    writes = []
    for (lay, site_), entries in sorted(per_site.items()):
        rows, pos, src = rows_pos_src(entries)
        values = acts[site_][lay][src, pos]
        if lay < l0:                                   # h^(l0-1): part of the starting state
            start[rows, pos - p0] = values
        else:
            writes.append((lay, site_, rows, pos - p0, values))
    return {"inputs": inputs, "cache": prefix_cache(None, kv, p0, sample) if p0 > 0 else None,
            "l0": l0, "start": start, "noise": bank[sample, p0:] if l0 == 0 else None, "writes": writes}


def trace_plan(model, ids: torch.Tensor, bank: torch.Tensor, plan: FactPlan, answer: torch.Tensor, n_layers: int,
               samples: int) -> tuple:
    """Every forward of one fact: the reference, then one per chunk. Call it inside ``model.session``
    (locally or remotely: one request), so the reference's activations and cache reach the chunks
    without being saved. Returns (reference probabilities [1 + S], answer id, chunk probabilities)."""
    p, a, acts, kv = trace_reference(model, ids, bank, plan.sites, n_layers, answer)
    k = len(plan.sites)
    by_site = {s: [acts[layer * k + i] for layer in range(n_layers)] for i, s in enumerate(plan.sites)}
    outs = []
    for chunk in plan.chunks:
        args = chunk_args(plan, chunk, ids, bank, by_site, kv, samples)
        outs.append(trace_chunk(model, args["inputs"], args["cache"], args["l0"], args["start"], args["noise"],
                                args["writes"], a))
    return p, a, outs


def trace_facts_prefix(lm, todo: list[tuple], cfg) -> list[tuple]:
    """Per fact (Fact, noise, restorations, answer): (mean restored probability per restoration [R]
    float64, low, high, answer id). One session: one request remotely."""
    S, L = cfg.samples, lm.arch.n_layers
    plans = [plan_fact(rest, len(f.ids), f.subject_first, L, cfg.window, S, cfg.max_rows, cfg.blocks, len(ans))
             for f, _, rest, ans in todo]
    banks = [noise_bank(f, noise) for f, noise, _, _ in todo]
    model = lm.model
    if lm.remote:
        from interpkit.remote import ensure_shipped

        ensure_shipped()                        # our trace helpers travel by value: NDIF does not have them
    jobs = [(f.ids, bank, plan, ans) for (f, _, _, ans), bank, plan in zip(todo, banks, plans)]
    with torch.no_grad():
        with model.session(remote=lm.remote):
            outs = list().save()
            for ids, bank, plan, ans in jobs:
                outs.append(trace_plan(model, ids, bank, plan, ans, L, S))
    results = []
    for plan, (p, a, chunk_probs) in zip(plans, outs):
        p = p.double()
        high, low = float(p[0]), float(p[1:].mean())
        values = torch.zeros(len(plan.unique), dtype=torch.float64)
        for chunk, q in zip(plan.chunks, chunk_probs):
            values[chunk.items] = q.double().view(-1, S).mean(1)
        by = {"low": low, "high": high}
        results.append((torch.tensor([values[s[1]].item() if s[0] == "unique" else by[s[0]] for s in plan.source],
                                     dtype=torch.float64), low, high, int(a.view(-1)[0])))
    return results
