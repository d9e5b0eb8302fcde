"""Direct logit attribution: the final residual at the last position split into the embedding, every
attention head (optionally per source position), each layer's attention bias and each MLP, each projected
on the task's logit-difference direction through the final norm with its scale frozen.

Convention (stated once, used everywhere): the final norm is linear once its per-position scale s is
fixed at the value it has on the actual run, norm(x) = g * P(x) / s + b (P centres for LayerNorm, is the
identity for RMSNorm; Gemma's gain is 1 + weight). The logit difference answer - wrong (mean over
answers minus mean over wrong answers; the answer logit alone when there is no wrong answer) is then
exactly sum over parts of part . P(g * (W_U[answer] - W_U[wrong]) / s) plus a constant (the final norm's
bias and the unembedding bias, reported as ``const``). Gemma-2's post-attention/post-MLP norms are frozen
the same way; its final logit soft-cap is not linear and is left out: DLA explains the logits before the
cap. The parts sum to the model's own (pre-cap) logit difference to float rounding (tested <= 1e-4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.analyses.tools.common import encode, geometry, run_trace
from interpkit.analyses.tools.reads import (Geometry, first, frozen_scale, masked_mean_rows, norm_gain, o_proj_weight,
                                  read_pattern, read_qkv)
from interpkit.errors import UserError
from interpkit.metrics import logit_diff
from interpkit.plots import pyplot, save_cropped


@dataclass
class DLAResult:
    """Per-prompt contributions of every part; ``total()`` re-adds them."""

    embed: torch.Tensor            # [B]
    heads: torch.Tensor            # [B, layers, heads]
    attn_bias: torch.Tensor        # [B, layers]
    mlp: torch.Tensor              # [B, layers]
    const: torch.Tensor            # [B] final-norm bias + unembedding bias
    logit_diff: torch.Tensor       # [B] the model's own logit difference (before any soft-cap)
    by_source: torch.Tensor | None = None   # [B, layers, heads, src positions]
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        return (self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1) + self.const)

    def max_error(self) -> float:
        return float((self.total() - self.logit_diff).abs().max())

    def ranked(self, k: int = 10) -> list[dict]:
        """The k parts with the largest |mean contribution| over prompts (heads, MLPs, embedding)."""
        parts = [("embed", float(self.embed.mean()))]
        L, H = self.heads.shape[1:]
        mean_heads = self.heads.mean(0)
        parts += [(f"L{l}H{h}", float(mean_heads[l, h])) for l in range(L) for h in range(H)]
        parts += [(f"L{l} mlp", float(v)) for l, v in enumerate(self.mlp.mean(0))]
        parts += [(f"L{l} attn bias", float(v)) for l, v in enumerate(self.attn_bias.mean(0)) if float(v) != 0.0]
        parts.sort(key=lambda p: -abs(p[1]))
        return [{"part": n, "contribution": round(v, 5)} for n, v in parts[:k]]


def trace_dla(model, inputs: dict, g: Geometry, answer: torch.Tensor, wrong: torch.Tensor, by_source: bool,
              remote=False):
    """The DLA trace: every read at the last position, projections after the final norm's scale is known.
    Runs unchanged locally and on NDIF (torch only)."""
    with model.trace(inputs, remote=remote):
        embed = first(model.layers[0].input)[:, -1].float()
        head_vecs, head_src, biases, mlps = [], [], [], []
        for layer in range(g.n_layers):
            block = model.layers[layer]
            if by_source:
                v = read_qkv(model, g, layer, "v").float()                         # [B, T, Hkv, dh]
            z = block.attn.o_proj.input[:, -1].float()
            z = z.reshape(z.shape[0], g.n_heads, g.d_head)
            W_O = o_proj_weight(model, g, layer).float()                          # [H, dh, d]
            hv = torch.einsum("bhe,hed->bhd", z, W_O)
            bias = block.attn.o_proj.bias.float() if g.o_bias else torch.zeros_like(hv[0, 0])
            post = torch.ones_like(hv[:, 0])                                      # [B, d] frozen post-norm
            if by_source:
                A = read_pattern(model, layer)[:, :, -1].float()                  # [B, H, T]
            if g.post_attn_norm is not None:
                attn_out = first(block.attn.output)[:, -1]
                post = (norm_gain(getattr(block, g.post_attn_norm), g.norm_offset)
                        / frozen_scale(attn_out, g.norm, g.post_eps))
                mlp = first(getattr(block, g.post_mlp_norm).output)[:, -1].float()
            else:
                mlp = first(block.mlp.output)[:, -1].float()
            head_vecs.append(hv * post[:, None])
            biases.append(bias[None] * post)
            mlps.append(mlp)
            if by_source:
                group = g.n_heads // g.n_kv_heads
                vv = v[:, :, torch.arange(g.n_heads) // group]                    # [B, T, H, dh]
                head_src.append((vv, A, W_O, post))
        x = first(model.final_norm.input)[:, -1]
        s = frozen_scale(x, g.norm, g.eps)                                        # [B, 1]
        gain = norm_gain(model.final_norm, g.norm_offset)
        W_U = model.unembed.weight
        direction = masked_mean_rows(W_U, answer) - masked_mean_rows(W_U, wrong)  # [B, d]
        e = gain * direction / s
        if g.norm == "layernorm":
            e = e - e.mean(-1, keepdim=True)
        const = torch.zeros_like(s[:, 0])
        if g.norm == "layernorm":
            const = const + direction @ model.final_norm.bias.float()
        if g.unembed_bias:
            b_U = model.unembed.bias.float()
            const = const + (masked_mean_rows(b_U[:, None], answer) - masked_mean_rows(b_U[:, None], wrong))[:, 0]
        target = logit_diff(model.unembed.output[:, -1].float(), answer, wrong).cpu().save()
        r_embed = (embed * e).sum(-1).cpu().save()
        r_heads = torch.stack([torch.einsum("bhd,bd->bh", hv, e) for hv in head_vecs], 1).cpu().save()
        r_bias = torch.stack([(b * e).sum(-1) for b in biases], 1).cpu().save()
        r_mlp = torch.stack([(m * e).sum(-1) for m in mlps], 1).cpu().save()
        r_const = const.cpu().save()
        r_src = list().save()
        for vv, A, W_O, post in head_src:
            u = torch.einsum("hed,bd->bhe", W_O, e * post)                         # [B, H, dh]
            r_src.append((torch.einsum("bthe,bhe->bht", vv, u) * A).cpu())
    return r_embed, r_heads, r_bias, r_mlp, r_const, target, r_src


def dla(lm, prompts, by_source: bool = False) -> DLAResult:
    """DLA of ``prompts`` (a PromptSet with answers; wrong answers give the logit-difference direction)."""
    answer = getattr(prompts, "answer_ids", None)
    if answer is None:
        raise UserError("DLA needs answers; pass a task (e.g. --task ioi) or a --dataset with an answer field")
    wrong = prompts.wrong_ids if prompts.wrong_ids is not None else torch.full_like(answer[:, :1], -1)
    inputs = encode(lm, prompts)
    emb, heads, bias, mlp, const, target, src = run_trace(lm, trace_dla, inputs, geometry(lm), answer, wrong,
                                                          by_source)
    return DLAResult(embed=emb, heads=heads, attn_bias=bias, mlp=mlp, const=const, logit_diff=target,
                     by_source=torch.stack(list(src), 1) if by_source else None,
                     input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def plot_dla(res: DLAResult, path, title: str = "direct logit attribution") -> str:
    """Heads (layer x head heatmap) next to the embedding / MLP bars, mean over prompts."""
    plt = pyplot()
    heads = res.heads.mean(0)
    L, H = heads.shape
    lim = float(heads.abs().max()) or 1.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 0.3 * H + 4, 1.5 + 0.3 * L),
                                 gridspec_kw={"width_ratios": [max(H, 4), 4]})
    im = a1.imshow(heads.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    a1.set_xlabel("head")
    a1.set_ylabel("layer")
    a1.set_title(f"{title}: heads", fontsize=9)
    fig.colorbar(im, ax=a1, label="contribution to logit diff")
    labels = ["embed"] + [f"mlp {l}" for l in range(L)]
    vals = [float(res.embed.mean())] + res.mlp.mean(0).tolist()
    a2.barh(range(len(vals)), vals, color=["tab:gray"] + ["tab:green"] * L)
    a2.set_yticks(range(len(vals)), labels, fontsize=6)
    a2.invert_yaxis()
    a2.set_title("embedding and MLPs", fontsize=9)
    return save_cropped(fig, path)
