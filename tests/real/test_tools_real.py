"""Everyday tools (issue 16) on the real pretrained model smollm2-135m (loaded once per session)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from interpkit.analyses.tools.attention import detect_heads
from interpkit.analyses.tools.cache import cache
from interpkit.analyses.tools.dla import dla
from interpkit.analyses.tools.logit_lens import logit_lens
from interpkit.analyses.tools.steering import steer
from interpkit.tasks import get_task
from tests.conftest import hf_inputs, hooked

pytestmark = pytest.mark.real

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The Eiffel Tower is in the city of"]


def test_real_cache_equals_forward_hooks(real_lm):
    ids, mask, pos = hf_inputs(real_lm, PROMPTS)
    ref, _ = hooked(real_lm, ids, mask, pos)
    L = real_lm.arch.n_layers
    acts = cache(real_lm, PROMPTS, sites=["resid_pre", "q", "k", "pattern", "mlp_out", "resid_post"],
                 layers=[0, L // 2, L - 1])
    real = mask.bool()
    for (site, layer), t in acts.acts.items():
        r = ref[site, layer]
        diff = (t - r).permute(0, 2, 1, 3)[real] if site == "pattern" else (t - r)[real]
        assert diff.abs().max() <= 1e-5 * max(1.0, float(r.abs().max())), (site, layer)


def test_real_logit_lens_and_dla_on_ioi(real_lm):
    ps = get_task("ioi")(real_lm.tokenizer, n=4, seed=0)
    lens = logit_lens(real_lm, ps, k=3, keep_logits=True)
    assert torch.equal(lens.logits[-1], lens.model_logits)
    assert (lens.answer_rank[-1] == 0).float().mean() >= 0.5          # the model mostly predicts IO
    mid = lens.answer_rank[real_lm.arch.n_layers // 2].float().median()
    assert mid > 100 and lens.answer_rank[-1].float().median() == 0          # the answer emerges late
    res = dla(real_lm, ps)
    assert res.max_error() <= 1e-4
    assert torch.allclose(res.logit_diff, lens.logit_diff[-1], atol=1e-4)   # same target, two computations


def test_real_induction_heads_and_steering(real_lm):
    scores = detect_heads(real_lm, n_tokens=12, batch=4)
    assert scores.detected("induction") and scores.detected("previous_token")
    assert all(layer > 0 for layer, _ in scores.detected("induction"))  # induction needs an earlier layer
    res = steer(real_lm, ["I love this, it is wonderful."], ["I hate this, it is terrible."], ["I think the movie was"],
                layer=6, coefficients=[0.0, 8.0], max_new_tokens=4)
    assert torch.equal(res.steered_ids[0], res.unsteered_ids) and res.kl[1] > 0


def test_real_dla_through_loopback_is_one_request(real_lm):
    from interpkit.remote.loopback import LoopbackNDIF

    ps = get_task("ioi")(real_lm.tokenizer, n=2, seed=1)
    local = dla(real_lm, ps)
    with LoopbackNDIF(real_lm.model) as server:
        remote = dla(replace(real_lm, remote=True), ps)
        assert server.n_requests == 1
    assert (local.heads - remote.heads).abs().max() < 1e-5 and remote.max_error() <= 1e-4
