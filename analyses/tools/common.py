"""Shared outside-trace helpers of the everyday tools: model geometry as plain values, inputs from prompts,
token labels and the dtype option."""
from __future__ import annotations

import torch

from interpkit.analyses.tools.reads import Geometry
from interpkit.arch import norm_eps
from interpkit.errors import UserError
from interpkit.load_options import DTYPES, parse_dtype  # noqa: F401  (re-exported for the tools)


def geometry(lm) -> Geometry:
    """The plain-value ``Geometry`` of a loaded model (works for weightless remote models too)."""
    a, hf = lm.arch, lm.hf
    fam = a.family
    post = a.post_attn_norm(0)
    out_emb = hf.get_output_embeddings()
    return Geometry(family=fam.name, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                    d_head=a.d_head, d_model=a.d_model, norm=fam.norm, norm_offset=fam.norm_offset,
                    eps=norm_eps(a.final_norm()),
                    softcap=float(getattr(hf.config, "final_logit_softcapping", None) or 0.0),
                    post_attn_norm=fam.post_attn_norm, post_mlp_norm=fam.post_mlp_norm,
                    post_eps=norm_eps(post) if post is not None else 0.0,
                    qk_layout=fam.qk_layout, qkv=fam.qkv, conv1d=fam.conv1d,
                    o_bias=getattr(a.o_proj(0), "bias", None) is not None,
                    unembed_bias=getattr(out_emb, "bias", None) is not None)


def encode(lm, prompts) -> dict:
    """Model inputs (left-padded) from a PromptSet, a list of strings, or a dict of tensors."""
    if isinstance(prompts, dict):
        return prompts
    if hasattr(prompts, "batch"):
        return prompts.batch()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts given; pass at least one prompt")
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def token_labels(lm, ids: torch.Tensor) -> list[str]:
    """Printable labels for one row of token ids."""
    return [lm.tokenizer.decode([int(t)]).replace("\n", "\\n") for t in ids.tolist()]


def check_layers(lm, layers: list[int] | None) -> list[int]:
    """All layers, or the given ones validated (negative indices count from the end)."""
    if layers is None:
        return list(range(lm.arch.n_layers))
    return [lm.arch.check_layer(int(l)) for l in layers]


def run_trace(lm, fn, *args):
    """``fn(model, *args, remote=lm.remote)``: one trace (one NDIF request remotely, after shipping our
    modules, which NDIF does not have), without gradients."""
    if lm.remote:
        from interpkit.remote import ensure_shipped

        ensure_shipped()
    with torch.no_grad():
        return fn(lm.model, *args, remote=lm.remote)


def run_traces(lm, calls: list) -> list:
    """``fn(model, *args)`` for every ``(fn, args)``: locally one after another; remotely all inside one
    ``model.session`` (one NDIF request; each fn's trace must not pass ``remote`` itself)."""
    if lm.remote:
        from interpkit.remote import ensure_shipped

        ensure_shipped()
        model = lm.model
        with model.session(remote=lm.remote):
            outs = list().save()
            for fn, args in calls:
                outs.append(fn(model, *args))
        return list(outs)
    with torch.no_grad():
        return [fn(lm.model, *args) for fn, args in calls]
