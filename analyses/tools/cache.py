"""Activation cache: any set of uniform sites for a batch of prompts in one trace (one NDIF request).

    acts = interpkit.cache(lm, ["When Mary and John went to the store, John gave a drink to"],
                           sites=["resid_pre", "pattern", "q"], layers=[0, 5])
    acts["resid_pre", 5]        # [batch, pos, d_model]

Sites (per layer): resid_pre, resid_post, attn_out, mlp_out (the sublayer outputs, before Gemma-2's post
norms), head_out [B, T, head, d_head] (the output projection's input), pattern [B, head, dest, src]
(post-softmax), q [B, T, head, d_head], k and v [B, T, kv_head, d_head] (the projections' outputs,
before rotary, as TransformerLens's hook_q/k/v). ``estimate_bytes`` says how much memory the cache takes
before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interpkit.analyses.tools.common import check_layers, encode, geometry, token_labels
from interpkit.analyses.tools.reads import Geometry, first, read_pattern, read_qkv
from interpkit.errors import UserError

CACHE_SITES = ("resid_pre", "q", "k", "v", "head_out", "pattern", "attn_out", "mlp_out", "resid_post")
"""In forward order within a layer (nnsight needs reads in that order)."""
SITE_ALIASES = {"resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out", "head": "head_out",
                "attention": "pattern", "attn_pattern": "pattern"}


@dataclass
class ActivationCache:
    """Labelled activations: ``cache[site, layer]`` is a tensor; ``dims[site]`` names its axes."""

    acts: dict[tuple[str, int], torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list[list[str]]
    dims: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        site, layer = key
        site = SITE_ALIASES.get(site, site)
        if (site, layer) not in self.acts:
            have = sorted({s for s, _ in self.acts})
            raise KeyError(f"({site!r}, {layer}) is not in this cache; it holds sites {have} "
                           f"at layers {sorted({l for _, l in self.acts})}")
        return self.acts[site, layer]

    def keys(self):
        return self.acts.keys()

    def __len__(self) -> int:
        return len(self.acts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acts.values())

    def to_hdf5(self, path) -> str:
        """One dataset per (site, layer) named ``<site>/<layer>``, with axis names as attributes."""
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("input_ids", data=self.input_ids.numpy())
            f.create_dataset("attention_mask", data=self.attention_mask.numpy())
            f.create_dataset("tokens", data=[[t.encode() for t in row] for row in self.tokens])
            for (site, layer), t in self.acts.items():
                d = f.create_dataset(f"{site}/{layer}", data=t.float().numpy() if t.dtype == torch.bfloat16
                                     else t.numpy())
                d.attrs["dims"] = ",".join(self.dims[site])
        return str(path)


def site_dims(site: str) -> tuple[str, ...]:
    return {"pattern": ("batch", "head", "dest", "src"), "head_out": ("batch", "pos", "head", "d_head"),
            "q": ("batch", "pos", "head", "d_head"), "k": ("batch", "pos", "kv_head", "d_head"),
            "v": ("batch", "pos", "kv_head", "d_head")}.get(site, ("batch", "pos", "d_model"))


def parse_sites(sites) -> list[str]:
    """Site names (aliases allowed, comma-separated text or a list), deduplicated, in forward order."""
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    out = []
    for s in sites or []:
        name = SITE_ALIASES.get(s, s)
        if name not in CACHE_SITES:
            raise UserError(f"unknown cache site {s!r}; use any of {', '.join(CACHE_SITES)} "
                            f"(aliases {', '.join(SITE_ALIASES)})")
        out.append(name)
    if not out:
        raise UserError("no sites given; e.g. sites=['resid_pre', 'pattern']")
    return sorted(set(out), key=CACHE_SITES.index)


def site_shape(g: Geometry, site: str, B: int, T: int) -> tuple[int, ...]:
    return {"pattern": (B, g.n_heads, T, T), "head_out": (B, T, g.n_heads, g.d_head),
            "q": (B, T, g.n_heads, g.d_head), "k": (B, T, g.n_kv_heads, g.d_head),
            "v": (B, T, g.n_kv_heads, g.d_head)}.get(site, (B, T, g.d_model))


def estimate_bytes(lm, sites, n_prompts: int, n_tokens: int, layers: list[int] | None = None,
                   dtype: torch.dtype | None = None) -> int:
    """Bytes the cache will hold (what comes back; the forward itself needs the model's usual memory)."""
    g = geometry(lm)
    layers = check_layers(lm, layers)
    size = torch.empty(0, dtype=dtype or _model_dtype(lm)).element_size()
    total = 0
    for s in parse_sites(sites):
        shape = site_shape(g, s, n_prompts, n_tokens)
        total += len(layers) * size * int(torch.tensor(shape).prod())
    return total


def _model_dtype(lm) -> torch.dtype:
    try:
        return next(lm.hf.parameters()).dtype
    except StopIteration:
        return torch.float32


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def trace_cache(model, inputs: dict, plan: list, g: Geometry, remote=False) -> list:
    """The cache trace: ``plan`` is [(layer, site), ...] in forward order; returns tensors in that order."""
    with model.trace(inputs, remote=remote):
        out = list().save()
        for layer, name in plan:
            block = model.layers[layer]
            if name == "resid_pre":
                x = first(block.input)
            elif name in ("q", "k", "v"):
                x = read_qkv(model, g, layer, name)
            elif name == "head_out":
                z = block.attn.o_proj.input
                x = z.reshape(z.shape[0], z.shape[1], g.n_heads, g.d_head)
            elif name == "pattern":
                x = read_pattern(model, layer)
            elif name == "attn_out":
                x = first(block.attn.output)
            elif name == "mlp_out":
                x = first(block.mlp.output)
            else:
                x = first(block.output)
            out.append(x.detach().clone())
    return out


def cache_call(lm, prompts, sites=("resid_pre",), layers: list[int] | None = None, max_bytes: float | None = None,
               echo=None):
    """(trace call, finish) of ``cache``: the estimate is checked here, before anything runs."""
    names = parse_sites(sites)
    layers = check_layers(lm, layers)
    inputs = encode(lm, prompts)
    B, T = inputs["input_ids"].shape
    need = estimate_bytes(lm, names, B, T, layers)
    if echo is not None:
        echo(f"cache: {len(names)} site(s) x {len(layers)} layer(s) for {B} prompt(s) x {T} tokens: "
             f"about {human_bytes(need)}")
    if max_bytes is not None and need > max_bytes:
        raise UserError(f"the cache would take {human_bytes(need)} (> limit {human_bytes(int(max_bytes))}); "
                        f"cache fewer sites/layers/prompts or raise the limit")
    plan = [(layer, name) for layer in sorted(layers) for name in names]

    def finish(values) -> ActivationCache:
        acts = {(name, layer): v.cpu() for (layer, name), v in zip(plan, values)}
        tokens = [token_labels(lm, row) for row in inputs["input_ids"]]
        return ActivationCache(acts=acts, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               tokens=tokens, dims={n: site_dims(n) for n in names})

    return (trace_cache, (inputs, plan, geometry(lm))), finish


def cache(lm, prompts, sites=("resid_pre",), layers: list[int] | None = None, max_bytes: float | None = None,
          echo=None) -> ActivationCache:
    """Cache ``sites`` at ``layers`` (default all) for ``prompts`` (strings, a PromptSet, or model inputs)
    in one forward; with a remote model that forward is one NDIF request.

    ``max_bytes``: refuse (before running) when the estimate exceeds it; ``echo`` prints the estimate.
    """
    from interpkit.analyses.tools.common import run_traces

    call, finish = cache_call(lm, prompts, sites, layers, max_bytes, echo)
    return finish(run_traces(lm, [call])[0])
