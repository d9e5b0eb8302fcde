"""Probing on tiny models: activations are exact (equal to forward hooks, locally, serialised and through
the loopback NDIF server), probes find the current token, lengthwise probes, the probe command."""
from __future__ import annotations

import functools

import pytest
import torch

from interpkit.analyses.probing.linear import (LengthwiseResult, ProbeConfig, collect_residuals, lengthwise_probe,
                                              probe_layers)


@functools.lru_cache(maxsize=None)
def word_lm(family: str, vocab: int = 40, seed: int = 0):
    """A tiny random model of ``family`` with a word-level tokenizer over w0..w{vocab-2} (no tokenizer files)."""
    from nnsight import TransformersModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from interpkit.arch import Arch
    from interpkit.families import family_for
    from interpkit.models import LoadedModel, tiny_config

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<pad>"] = vocab - 1
    t = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<pad>", pad_token="<pad>", eos_token="<pad>",
                                  padding_side="left")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(tiny_config(family, vocab), attn_implementation="eager").eval()
    fam = family_for(hf.config.model_type)
    return LoadedModel(f"word:{family}", TransformersModel(hf, tokenizer=tok, rename=fam.rename), Arch.from_hf(hf, fam), tok)


def _hook_residuals(lm, inputs):
    """Reference: block-0 input and every block output by plain PyTorch hooks on the HF modules.

    nnsight derives position ids from the attention mask (left padding starts at position 0), so the
    plain forward gets the same position ids.
    """
    blocks = [lm.arch.block(i) for i in range(lm.arch.n_layers)]
    got = []

    def pre(mod, args, kwargs):
        got.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def post(mod, args, out):
        got.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    hs = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)] + [b.register_forward_hook(post) for b in blocks]
    try:
        with torch.no_grad():
            lm.hf(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0))
    finally:
        for h in hs:
            h.remove()
    return torch.stack(got, 1)                                                 # [N, L+1, T, d]


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_activations_equal_forward_hooks(family):
    lm = word_lm(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 39, (7, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                                           # a left-padded row
    ids[0, :2] = 39
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = _hook_residuals(lm, inputs)
    acts = collect_residuals(lm, inputs, "all", chunk_rows=3)                 # 3 chunks
    assert acts.shape == (7, lm.arch.n_layers + 1, 6, 64)
    assert (acts - ref).abs().max().item() < 1e-6
    last = collect_residuals(lm, inputs, "last")
    close = lambda a, b: (a - b).abs().max().item() < 1e-6  # noqa: E731  (batch size changes float sums)
    assert close(last, acts[:, :, -1])
    role = torch.tensor([5, 4, 3, 2, 1, 0, 5])
    at_role = collect_residuals(lm, inputs, role)
    assert close(at_role, acts[torch.arange(7), :, role])
    two = collect_residuals(lm, inputs, torch.stack([role, torch.full((7,), 5)], 1))
    assert two.shape == (7, lm.arch.n_layers + 1, 2, 64) and close(two[:, :, 1], acts[:, :, 5])


def test_probe_layers_on_a_model_finds_the_current_token():
    lm = word_lm("gpt2")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 39, (40, 6), generator=g)
    labels = {"token_mod4": ids % 4, "parity": ids % 2}
    res = probe_layers(lm, ids, labels, positions="all", cfg=ProbeConfig(seed=1))
    assert res.targets == ["token_mod4", "parity"] and res.layers == [0, 1, 2, 3]
    assert res.test_acc[:, 0].min() >= 0.95                                    # embeddings carry token identity
    assert res.n_rows["parity"] == (len(res.train_prompts) * 6, len(res.test_prompts) * 6)
    last = probe_layers(lm, ids, labels, positions="last", cfg=ProbeConfig(seed=1))
    assert last.n_rows["parity"] == (len(last.train_prompts), len(last.test_prompts))


def test_lengthwise_probe_matrix_and_heatmap(tmp_path):
    lm = word_lm("gpt2")

    def make(length, n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 6, (n, length), generator=g)
        return ids, {"last_mod3": ids[:, -1] % 3, "first_mod2": ids[:, 0] % 2}

    res = lengthwise_probe(lm, make, range(2, 5), n_prompts=40, cfg=ProbeConfig(max_iter=100))
    assert isinstance(res, LengthwiseResult)
    assert res.test_acc.shape == (2, lm.arch.n_layers + 1, 3) and res.lengths == [2, 3, 4]
    assert res.test_acc[0, 0].min() >= 0.9                                    # final token read at layer 0
    assert res.first_decodable_layer("last_mod3") == [0, 0, 0]
    assert len(res.to_dataframe()) == 2 * 4 * 3
    res.plot(tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000


def _remote_acts(remote_lm, lm, freeze: bool):
    from interpkit.remote.loopback import frozen

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 39, (10, 5), generator=g)
    with frozen(lm.hf, freeze):                                          # NDIF runs models frozen
        local = collect_residuals(lm, ids, "all", chunk_rows=4)
    remote = collect_residuals(remote_lm, ids, "all", chunk_rows=4)     # 3 chunks, one session
    assert torch.equal(local, remote)


def test_serialised_session_equals_local():
    import dataclasses

    lm = word_lm("llama")
    _remote_acts(dataclasses.replace(lm, remote="local"), lm, freeze=False)


def test_loopback_ndif_equals_local():
    import dataclasses

    from tests.conftest import server_threads

    loopback = pytest.importorskip("interpkit.remote.loopback")
    lm = word_lm("llama")
    torch.set_num_threads(server_threads())
    with loopback.LoopbackNDIF(lm.model) as server:
        _remote_acts(dataclasses.replace(lm, remote=True), lm, freeze=True)
    assert server.n_requests == 1                                        # 3 chunks, one request


def test_probe_command_writes_run(tmp_path, capsys):
    from interpkit.analyses.probing.command import probe_command
    from tests.conftest import calendar_lm

    lm = calendar_lm()
    res = probe_command("calendar-random", "days", ["a", "b"], positions="start", lm=lm, root=str(tmp_path),
                        cfg=ProbeConfig(max_iter=50))
    assert res.targets == ["a", "b"]
    assert res.test_acc[0, 0] == 1.0                                     # the start token itself at layer 0
    out = capsys.readouterr().out
    assert "layer" in out and "results:" in out
    run = next((tmp_path / "probe").iterdir())
    assert (run / "probe.png").exists() and (run / "results.h5").exists() and (run / "probe.csv").exists()


def test_probe_command_split_by_a_field(tmp_path, capsys):
    from interpkit.analyses.probing.command import probe_command
    from interpkit.errors import UserError
    from interpkit.models import load_model

    lm = load_model("tiny:gpt2")
    res = probe_command("tiny:gpt2", "gp", ["gender"], positions="name", lm=lm, root=str(tmp_path), n=100,
                        cfg=ProbeConfig(max_iter=30), split_by="name")
    from interpkit.tasks import get_task

    names = get_task("gp")(lm.tokenizer, n=100, seed=0).meta["name"]
    assert {names[i] for i in res.test_prompts.tolist()}.isdisjoint({names[i] for i in res.train_prompts.tolist()})
    assert "split by name: held-out" in capsys.readouterr().out
    with pytest.raises(UserError, match="--split-by 'nom' is not a field"):
        probe_command("tiny:gpt2", "gp", ["gender"], lm=lm, root=str(tmp_path), n=100, split_by="nom")
