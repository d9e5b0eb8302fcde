"""Everyday tools (issue 16) on the five tiny families: cache, logit lens, DLA, attention, steering, custom
datasets. Every numeric check is against an independent computation with plain PyTorch forward hooks on
the HF modules (no nnsight)."""
from __future__ import annotations

import pytest
import torch

from interpkit.analyses.tools.cache import CACHE_SITES, cache, estimate_bytes
from interpkit.analyses.tools.dla import dla
from interpkit.analyses.tools.logit_lens import logit_lens
from interpkit.errors import UserError
from interpkit.tasks import get_task
from tests.conftest import FAMILIES, hf_inputs, hooked, tiny

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "Then, Alice said to"]


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_equals_forward_hooks(family):
    lm = tiny(family)
    ids, mask, pos = hf_inputs(lm, PROMPTS)
    ref, _ = hooked(lm, ids, mask, pos)
    acts = cache(lm, PROMPTS, sites=CACHE_SITES)
    assert len(acts) == len(CACHE_SITES) * lm.arch.n_layers
    real = mask.bool()
    for (site, layer), t in acts.acts.items():
        r = ref[site, layer]
        assert t.shape == r.shape, (site, layer)
        if site == "pattern":
            err = (t - r).permute(0, 2, 1, 3)[real].abs().max()          # real destination rows
        else:
            err = (t - r)[real].abs().max()
        assert err < 1e-5, (family, site, layer, float(err))
    assert acts["attn", 0] is acts.acts["attn_out", 0]                     # aliases
    assert estimate_bytes(lm, CACHE_SITES, *ids.shape) == acts.nbytes()


def test_cache_hdf5_and_limits(tmp_path):
    import h5py

    lm = tiny("llama")
    acts = cache(lm, PROMPTS, sites="resid,pattern,k", layers=[0, -1])
    path = acts.to_hdf5(tmp_path / "c.h5")
    with h5py.File(path) as f:
        assert f["pattern/2"].attrs["dims"] == "batch,head,dest,src"
        assert torch.equal(torch.as_tensor(f["k/0"][()]), acts["k", 0])
    with pytest.raises(UserError, match="would take"):
        cache(lm, PROMPTS, sites=["resid_pre"], max_bytes=10)
    with pytest.raises(UserError, match="unknown cache site"):
        cache(lm, PROMPTS, sites=["residual"])
    with pytest.raises(UserError, match="out of range"):
        cache(lm, PROMPTS, sites=["resid_pre"], layers=[7])
    with pytest.raises(KeyError, match="not in this cache"):
        acts["mlp_out", 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_last_row_is_the_model_and_middle_rows_match_hooks(family):
    lm = tiny(family)
    ps = get_task("ioi")(lm.tokenizer, n=3, seed=0)
    res = logit_lens(lm, ps, k=4, keep_logits=True)
    assert res.top_ids.shape[:2] == (lm.arch.n_layers + 1, 3)
    assert torch.equal(res.logits[-1], res.model_logits)                     # exactly the model's logits
    # independent: final norm + unembedding of HF's hidden states (hidden_states[l] enters layer l)
    ids, mask = ps.input_ids, ps.attention_mask
    with torch.no_grad():
        out = lm.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    output_hidden_states=True)
        base = getattr(lm.hf, "transformer", None) or getattr(lm.hf, "gpt_neox", None) or lm.hf.model
        norm = getattr(base, "ln_f", None) or getattr(base, "final_layer_norm", None) or base.norm
        cap = getattr(lm.hf.config, "final_logit_softcapping", None)
        for l in range(lm.arch.n_layers):                  # the last hidden state is already normed by HF
            logits = lm.hf.get_output_embeddings()(norm(out.hidden_states[l][:, -1])).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            assert (logits - res.logits[l]).abs().max() < 1e-4, (family, l)
            p = logits.softmax(-1)
            assert torch.allclose(p.topk(4).values, res.top_probs[l, :, -1], atol=1e-5)
            a = ps.answer_ids[:, 0]
            assert torch.equal((logits > logits.gather(-1, a[:, None])).sum(-1), res.answer_rank[l])
    assert torch.allclose(res.answer_prob[-1], out.logits[:, -1].float().softmax(-1).gather(
        -1, ps.answer_ids[:, :1])[:, 0], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_parts_sum_to_the_logit_difference(family):
    lm = tiny(family)
    for task in ("ioi", "gt"):                                 # gt: many answers and wrong answers per row
        ps = get_task(task)(lm.tokenizer, n=4, seed=1)
        res = dla(lm, ps, by_source=True)
        assert res.max_error() <= 1e-4, (family, task, res.max_error())
        assert res.logit_diff.abs().max() > 1e-3                  # a non-trivial target
        assert (res.by_source.sum(-1) - res.heads).abs().max() < 1e-5
    # the target is the model's own (pre-softcap) logit difference from a plain forward
    ps = get_task("ioi")(lm.tokenizer, n=4, seed=1)
    with torch.no_grad():
        cap = getattr(lm.hf.config, "final_logit_softcapping", None)
        lm.hf.config.final_logit_softcapping = None
        try:
            logits = lm.hf(**ps.batch(), position_ids=(ps.attention_mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
        finally:
            lm.hf.config.final_logit_softcapping = cap
    ld = logits.gather(-1, ps.answer_ids[:, :1])[:, 0] - logits.gather(-1, ps.wrong_ids[:, :1])[:, 0]
    assert torch.allclose(dla(lm, ps).logit_diff, ld, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_dla_heads_match_a_hook_computation(family):
    """Head h's part = (z_h W_O[h]) through the frozen norms, dotted with W_U[IO] - W_U[S], from raw hooks."""
    lm = tiny(family)
    a = lm.arch
    ps = get_task("ioi")(lm.tokenizer, n=3, seed=2)
    ids, mask = ps.input_ids, ps.attention_mask
    z, attn_out, handles = {}, {}, []
    for l in range(a.n_layers):
        o = a.attn_module(l).c_proj if family == "gpt2" else a.attn_module(l).o_proj
        handles.append(o.register_forward_hook(lambda m, ar, out, l=l: z.__setitem__(l, ar[0][:, -1])))
        handles.append(a.attn_module(l).register_forward_hook(lambda m, ar, out, l=l: attn_out.__setitem__(l, out[0][:, -1])))
    with torch.no_grad():
        lm.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    for h in handles:
        h.remove()
    base = lm.hf.transformer if family == "gpt2" else lm.hf.model
    norm = base.ln_f if family == "gpt2" else base.norm
    res = dla(lm, ps)
    W_U = lm.hf.get_output_embeddings().weight
    d = W_U[ps.answer_ids[:, 0]] - W_U[ps.wrong_ids[:, 0]]
    # the frozen final-norm scale from the model's own final-norm input, caught by a hook
    caught = {}
    hk = norm.register_forward_hook(lambda m, ar, o: caught.__setitem__("x", ar[0][:, -1]))
    with torch.no_grad():
        lm.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    hk.remove()
    xf = caught["x"]
    if family == "gpt2":
        s = (xf - xf.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
        e = norm.weight * d / s
        e = e - e.mean(-1, keepdim=True)
    else:
        s = xf.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
        e = (1 + norm.weight) * d / s
    for l in range(a.n_layers):
        W_O = a.o_proj_weight(l)
        hv = torch.einsum("bhe,hed->bhd", z[l].unflatten(-1, (a.n_heads, a.d_head)), W_O)
        if family == "gemma2":
            post = a.block(l).post_attention_layernorm
            hv = hv * (1 + post.weight) / attn_out[l].pow(2).mean(-1, keepdim=True).add(post.eps).sqrt()[:, None]
        ref = torch.einsum("bhd,bd->bh", hv, e)
        assert torch.allclose(res.heads[:, l], ref, atol=1e-5), (family, l)


def test_dla_and_lens_errors():
    lm = tiny("gpt2")
    with pytest.raises(UserError, match="needs answers"):
        dla(lm, PROMPTS)
    with pytest.raises(UserError, match="top-k"):
        logit_lens(lm, PROMPTS, k=0)
    res = logit_lens(lm, PROMPTS)                                 # plain strings: no answer rows
    assert torch.isnan(res.answer_prob).all() and (res.answer_rank == -1).all()
