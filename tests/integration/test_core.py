"""Core identities on every tiny family: sites, per-head outputs, folded Q/K, patching identities."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from interpkit.arch import attention_scores
from interpkit.errors import UserError
from interpkit.sites import attention_pattern, site
from tests.conftest import ids_for

TEXT = ["When Mary and John went to the store, John gave a drink to", "The war lasted from the year 1732 to the year 17"]


def test_uniform_names_and_geometry(lm):
    a = lm.arch
    assert a.n_layers == 3 and a.n_heads == 4 and a.d_model == 64 and a.d_head == 16
    assert a.n_kv_heads == (4 if a.family.name in ("gpt2", "neox") else 2)
    assert a.rotary == (a.family.name != "gpt2")
    for name in ("embed", "layers", "final_norm", "unembed"):
        assert hasattr(lm.model, name), name
    assert hasattr(lm.model.layers[0].attn, "o_proj") and hasattr(lm.model.layers[0], "mlp")


def _logits(lm, inputs):
    with torch.no_grad(), lm.model.trace(inputs):
        out = lm.model.output.logits.save()
    return out


def test_clean_into_clean_is_identity(lm):
    inputs = ids_for(lm, TEXT)
    ref = _logits(lm, inputs)
    with torch.no_grad(), lm.model.trace() as tracer:
        with tracer.invoke(inputs):
            saved = [site(lm.model, "resid_post", l).clone() for l in [0]]
            for l in range(1, lm.arch.n_layers):
                saved.append(site(lm.model, "resid_post", l).clone())
        with tracer.invoke(inputs):
            for l in range(lm.arch.n_layers):
                h = site(lm.model, "resid_post", l)
                h[:] = saved[l]
            patched = lm.model.output.logits.save()
    assert (patched - ref).abs().max().item() < 1e-6


def test_zeroing_a_layer_changes_logits(lm):
    inputs = ids_for(lm, TEXT)
    ref = _logits(lm, inputs)
    with torch.no_grad(), lm.model.trace(inputs):
        h = site(lm.model, "resid_post", 1)
        h[:] = 0
        zeroed = lm.model.output.logits.save()
    assert (zeroed - ref).abs().max().item() > 1e-3


def test_head_outputs_write_and_recombine(lm):
    """Per-head outputs written through the adapter's view recombine via W_O into the attention output."""
    inputs = ids_for(lm, TEXT)
    a, layer = lm.arch, 1
    scale = torch.tensor([1.0, -2.0, 0.5, 3.0])
    with torch.no_grad(), lm.model.trace(inputs):
        z = site(lm.model, "head_out", layer, a.n_heads)
        z[:] = z * scale[None, None, :, None]
        z_written = z.clone().save()
        attn_out = site(lm.model, "attn_out", layer).save()
    recombined = torch.einsum("bthe,hed->btd", z_written, a.o_proj_weight(layer)) + a.o_proj_bias(layer)
    assert (recombined - attn_out).abs().max().item() < 1e-5


def test_folded_qk_reproduce_scores(lm):
    """Scores from folded W_Q/W_K (rotated for rotary families) match the model's, up to the softmax shift."""
    inputs = ids_for(lm, TEXT[:1])
    T = inputs["input_ids"].shape[1]
    with torch.no_grad(), lm.model.trace(inputs):
        resid, pattern = list().save(), list().save()
        for l in range(lm.arch.n_layers):
            resid.append(site(lm.model, "resid_pre", l).save())
            pattern.append(attention_pattern(lm.model, l).save())
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(lm.arch.n_layers):
        ours = attention_scores(lm.arch, resid[l], l).masked_fill(~causal, float("nan"))
        theirs = pattern[l].float().clamp_min(1e-38).log().masked_fill(~causal, float("nan"))
        centre = lambda s: s - s.nanmean(-1, keepdim=True)  # noqa: E731
        assert (centre(ours) - centre(theirs)).nan_to_num().abs().max().item() < 1e-4


def test_index_and_name_errors():
    from tests.conftest import tiny

    lm = tiny("gpt2")
    with pytest.raises(UserError, match="layer 7 is out of range"):
        lm.arch.check_layer(7)
    with pytest.raises(UserError, match="head 9 is out of range"):
        lm.arch.check_head(9)
    from interpkit.models import load_model
    with pytest.raises(UserError, match="unknown tiny model"):
        load_model("tiny:bert")
    with pytest.raises(UserError, match="cannot download"):
        load_model("someorg/not-a-model")


@pytest.mark.parametrize("args, message", [
    (["patch", "--model", "nosuchorg/none", "--task", "ioi"], "cannot download"),
    (["patch", "--model", "tiny:gpt2", "--task", "ioi", "--layers", "9"], "layer 9 is out of range"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message):
    r = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
