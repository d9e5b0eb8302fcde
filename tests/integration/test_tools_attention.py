"""Attention tools (issue 16): role attention against the cache, head detectors on a 2-layer attention-only
model trained here to do induction versus the same architecture with random weights, and the S3 demo model's final-position attention."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interpkit.analyses.tools.attention import detect_heads, dest_profile, repeated_tokens, role_attention
from interpkit.analyses.tools.cache import cache
from interpkit.errors import UserError
from interpkit.tasks import get_task
from tests.conftest import tiny

V, P, N = 64, 32, 8                           # vocabulary, positions, length of the repeated block


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, V)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>")


def repeat_batch(gen: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training data for induction: random tokens with a block of random length (3..15) repeated at a
    random offset, and the mask of the predictable tokens (the repeat after its first token). Random
    lengths and offsets leave no positional shortcut: only "find the earlier copy, read what followed"."""
    ids = torch.randint(2, V, (rows, P), generator=gen)
    mask = torch.zeros(rows, P, dtype=torch.bool)
    for r in range(rows):
        n = int(torch.randint(3, (P - 1) // 2 + 1, (1,), generator=gen))
        off = 1 + int(torch.randint(0, P - 2 * n, (1,), generator=gen))
        ids[r, off + n:off + 2 * n] = ids[r, off:off + n]
        mask[r, off + n + 1:off + 2 * n] = True
    ids[:, 0] = 0
    return ids, mask


def attention_only(trained: bool, steps: int = 300, seed: int = 0):
    """A 2-layer, 2-head attention-only Llama (RoPE; MLPs zero and frozen), as a LoadedModel.

    trained=True trains it here on ``repeat_batch`` (300 steps, about 15 s on 2 cores): the classic
    circuit forms, a previous-token head in layer 0 and induction heads in layer 1. (A GPT-2 with learned
    absolute positions trained the same way found positional shortcuts instead; rotary positions make the
    previous-token head easy.) trained=False: the same architecture at its random init."""
    from nnsight import TransformersModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from interpkit.arch import Arch
    from interpkit.families import FAMILIES
    from interpkit.models import LoadedModel

    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=4, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=P, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(cfg)
        for block in hf.model.layers:
            for p in block.mlp.parameters():
                p.data.zero_()
                p.requires_grad_(False)
        if trained:
            opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=3e-3)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                ids, mask = repeat_batch(gen, 128)
                logits = hf(ids).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
                opt.zero_grad()
                loss.backward()
                opt.step()
    hf.config._attn_implementation = "eager"
    hf.eval()
    tok = _tokenizer()
    fam = FAMILIES["llama"]
    model = TransformersModel(hf, tokenizer=tok, rename=fam.rename)
    model.repo_id = "tiny:induction"
    return LoadedModel(name="induction", model=model, arch=Arch.from_hf(hf, fam), tokenizer=tok)


def test_induction_heads_detected_on_a_trained_model_not_on_random_weights():
    trained, random = attention_only(True), attention_only(False)
    ids, mask = repeat_batch(torch.Generator().manual_seed(99), 64)
    with torch.no_grad():
        pred = trained.hf(ids).logits[:, :-1].argmax(-1)
    assert float((pred[mask[:, 1:]] == ids[:, 1:][mask[:, 1:]]).float().mean()) > 0.9     # it does induction
    ids, offset = repeated_tokens(trained, N, batch=4)
    assert offset == 0 and ids.shape == (4, 2 * N) and torch.equal(ids[:, :N], ids[:, N:])
    for n in (5, N, 12):                                     # by content: any period is detected
        s = detect_heads(trained, n_tokens=n, batch=16, seed=1)
        assert {l for l, _ in s.detected("induction")} == {1}, (n, s.table())
        assert s.detected("previous_token") and {l for l, _ in s.detected("previous_token")} == {0}, (n, s.table())
        assert s.detected("duplicate_token") == []
    s_random = detect_heads(random, n_tokens=N, batch=16, seed=1)
    assert s_random.detected("induction") == [] and s_random.detected("previous_token") == []
    assert float(s_random.scores.max()) < 0.3
    # the score is the mean attention to the induction target, read from the raw HF attention weights
    small = detect_heads(trained, n_tokens=N, batch=4, seed=0)
    with torch.no_grad():
        A = trained.hf(ids, output_attentions=True).attentions[1]
    d = torch.arange(N, 2 * N)
    for h in range(2):
        assert torch.allclose(small.scores[2, 1, h], A[:, h, d, d - N + 1].mean(), atol=1e-6)


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
    path = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "s3-demo"
    if not (path / "config.json").exists():
        pytest.skip("the S3 demo model is not shipped in this checkout")
    from interpkit.analyses.tools.command import attention_command
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
