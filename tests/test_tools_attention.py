"""Attention tools (issue 16): role attention against the cache, head detectors on a model with a planted
induction head (a 2-layer attention-only GPT-2 with hand-set weights) versus the same architecture with
random weights, and the S3 demo model's final-position attention."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analyses.tools.attention import detect_heads, dest_profile, repeated_tokens, role_attention
from analyses.tools.cache import cache
from interpkit.errors import UserError
from tasks import get_task
from tests.conftest import tiny

V, P, N = 32, 24, 8                           # vocabulary, positions, length of the repeated block
D = V + P + V                                  # residual: token one-hot | position one-hot | previous token


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, V)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>")


def attention_only(planted: bool, seed: int = 0):
    """A 2-layer, 1-head-per-layer attention-only GPT-2 (MLPs zero), as a LoadedModel.

    planted=True sets the weights by hand: layer 0 is a previous-token head (query = own position, key =
    position + 1) whose value writes the token into a "previous token" block; layer 1 is an induction head
    (query = own token, key = the previous-token block), so it attends to the token after an earlier
    occurrence of the current one, by content, at any distance. (Training such a model on repeated random
    tokens with one fixed period learns a positional shortcut instead - layer 0 attending d -> d-n+1 -
    which is why the head is planted.) planted=False: the same architecture with GPT-2's random init."""
    from nnsight import TransformersModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from interpkit.arch import Arch
    from interpkit.families import FAMILIES
    from interpkit.models import LoadedModel

    cfg = GPT2Config(n_layer=2, n_embd=D, n_head=1, vocab_size=V, n_positions=P, n_inner=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(cfg)
    hf.config._attn_implementation = "eager"
    tr = hf.transformer
    with torch.no_grad():
        for block in tr.h:
            for p in block.mlp.parameters():
                p.zero_()
        if planted:
            T0, P0, R0, a = 0, V, V + P, 40.0
            for name, p in hf.named_parameters():
                if "mlp" not in name:
                    p.fill_(1.0) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else p.zero_()
            tr.wte.weight[:, T0:T0 + V] = torch.eye(V)
            tr.wpe.weight[:, P0:P0 + P] = torch.eye(P)
            W0, W1 = tr.h[0].attn.c_attn.weight, tr.h[1].attn.c_attn.weight      # x @ W -> q | k | v
            for i in range(P):
                W0[P0 + i, P0 + i] = a
                if i + 1 < P:
                    W0[P0 + i, D + P0 + i + 1] = 1.0
            for t in range(V):
                W0[T0 + t, 2 * D + R0 + t] = 1.0
                W1[T0 + t, T0 + t] = a
                W1[R0 + t, D + T0 + t] = 1.0
                W1[T0 + t, 2 * D + T0 + t] = 1.0
            for block in tr.h:
                block.attn.c_proj.weight.copy_(torch.eye(D))
    hf.eval()
    tok = _tokenizer()
    fam = FAMILIES["gpt2"]
    model = TransformersModel(hf, tokenizer=tok, rename=fam.rename)
    model.repo_id = "tiny:induction"
    return LoadedModel(name="induction", model=model, arch=Arch.from_hf(hf, fam), tokenizer=tok)


def test_induction_head_detected_on_a_planted_model_not_on_random_weights():
    planted, random = attention_only(True), attention_only(False)
    ids, offset = repeated_tokens(planted, N, batch=4)
    assert offset == 0 and ids.shape == (4, 2 * N) and torch.equal(ids[:, :N], ids[:, N:])
    for n in (5, N, 11):                                     # by content: any period is detected
        s = detect_heads(planted, n_tokens=n, batch=16, seed=1)
        assert s.detected("induction") == [(1, 0)], (n, s.table())
        assert s.detected("previous_token") == [(0, 0)], (n, s.table())
        assert s.detected("duplicate_token") == []
    s_random = detect_heads(random, n_tokens=N, batch=16, seed=1)
    assert s_random.detected("induction") == [] and s_random.detected("previous_token") == []
    assert float(s_random.scores.max()) < 0.3
    # the score is the mean attention to the induction target, read from the raw HF attention weights
    small = detect_heads(planted, n_tokens=N, batch=4, seed=0)
    with torch.no_grad():
        A = planted.hf(ids, output_attentions=True).attentions[1]
    d = torch.arange(N, 2 * N)
    assert torch.allclose(small.scores[2, 1, 0], A[:, 0, d, d - N + 1].mean(), atol=1e-6)


def test_role_attention_and_profile_match_the_cache():
    lm = tiny("llama")
    ps = get_task("ioi")(lm.tokenizer, n=4, seed=0)
    ra = role_attention(lm, ps, "end", "IO")
    prof = dest_profile(lm, ps, "S2")
    acts = cache(lm, ps, sites=["pattern"])
    rows = torch.arange(4)
    for i, layer in enumerate(ra.layers):
        A = acts["pattern", layer]
        assert torch.allclose(ra.per_prompt[:, i], A[rows, :, ps.roles["end"], ps.roles["IO"]], atol=1e-7)
        assert torch.allclose(prof.per_prompt[:, i], A[rows, :, ps.roles["S2"]], atol=1e-7)
    assert torch.allclose(prof.by_layer().sum(-1), torch.ones(len(prof.layers)), atol=1e-5)
    with pytest.raises(UserError, match="unknown role"):
        role_attention(lm, ps, "end", "XYZ")


def test_s3_demo_final_position_attention(tmp_path):
    """On the shipped S3 model: where the final position attends, per layer (mean over heads and stories)."""
    path = Path(__file__).resolve().parents[1] / "artifacts" / "models" / "s3-demo"
    if not (path / "config.json").exists():
        pytest.skip("the S3 demo model is not shipped in this checkout")
    from analyses.tools.command import attention_command
    from interpkit.models import load_model

    lm = load_model(str(path))
    ps = get_task("permutations")(lm.tokenizer, n=16, seed=0)
    prof = dest_profile(lm, ps, "end")
    by_layer = prof.by_layer()
    assert by_layer.shape == (lm.arch.n_layers, ps.input_ids.shape[1])
    assert torch.allclose(by_layer.sum(-1), torch.ones(lm.arch.n_layers), atol=1e-5)
    out = attention_command(str(path), task="permutations", n=16, dest="end", layers=[0, lm.arch.n_layers - 1],
                            out=str(tmp_path), echo=lambda *a: None)
    assert [r["layer"] for r in out["summary"]["from end"]] == [0, lm.arch.n_layers - 1]
    assert Path(out["figures"][-1]).exists()
