"""Probing: planted features are found where planted, the split is prompt-level, activations are exact."""
from __future__ import annotations

import functools

import pytest
import torch

from interpkit.analyses.probing.linear import (LengthwiseResult, ProbeConfig, ProbeResult, collect_residuals, lengthwise_probe,
                              fit_probes, probe_activations, probe_layers, prompt_split)



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


def _planted(N=120, L=4, P=5, d=32, k=2, n_classes=3, seed=0):
    """Noise at every layer; at layer k the label's class centroid is added (linearly decodable)."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(N, L, P, d, generator=g)
    labels = torch.randint(0, n_classes, (N, P), generator=g)
    centroids = 3.0 * torch.randn(n_classes, d, generator=g)
    acts[:, k] += centroids[labels]
    return acts, labels


def test_planted_feature_found_only_at_its_layer():
    acts, labels = _planted(k=2)
    res = probe_activations(acts, {"planted": labels}, ProbeConfig(seed=0, max_iter=100))
    assert isinstance(res, ProbeResult)
    acc = res.test_acc[0]
    assert acc[2] >= 0.95
    for layer in (0, 1, 3):
        assert abs(acc[layer] - 1 / 3) < 0.12, (layer, acc)
    assert res.best_layer("planted") == 2
    df = res.to_dataframe()
    assert set(df.columns) >= {"target", "layer", "train_acc", "test_acc", "chance"} and len(df) == 4


def test_adam_and_lbfgs_agree_and_are_deterministic():
    acts, labels = _planted(N=60, P=3, k=1)
    a = probe_activations(acts, {"y": labels}, ProbeConfig(optimizer="lbfgs", max_iter=100))
    b = probe_activations(acts, {"y": labels}, ProbeConfig(optimizer="lbfgs", max_iter=100))
    c = probe_activations(acts, {"y": labels}, ProbeConfig(optimizer="adam", max_iter=150, lr=0.05))
    assert torch.equal(a.test_acc, b.test_acc)
    assert c.test_acc[0, 1] >= 0.95 and a.test_acc[0, 1] >= 0.95


def test_split_is_prompt_level_no_leakage():
    train, test = prompt_split(50, 0.2, seed=3)
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(50)) and len(test) == 10
    # Each prompt has its own random vector at every position and its own random label: only memorising
    # prompts (a leaky position-level split) could decode it, so test accuracy must stay near chance.
    g = torch.Generator().manual_seed(0)
    N, P, d = 100, 8, 128
    proto = torch.randn(N, 1, d, generator=g)
    acts = (proto + 0.05 * torch.randn(N, P, d, generator=g))[:, None]       # [N, 1, P, d]
    labels = torch.randint(0, 2, (N, 1), generator=g).expand(N, P).clone()
    cfg = ProbeConfig(weight_decay=1e-4, max_iter=100)
    res = probe_activations(acts, {"prompt_label": labels}, cfg)
    assert res.train_acc[0, 0] > 0.95                                          # memorised on train
    assert res.test_acc[0, 0] < 0.7                                            # but nothing leaks to test
    assert set(res.train_prompts.tolist()).isdisjoint(res.test_prompts.tolist())
    # the same probe with a position-level split would look (wrongly) excellent
    X, y = acts[:, :, :].permute(0, 2, 1, 3).reshape(N * P, 1, d), labels.reshape(-1)
    rows = torch.randperm(N * P, generator=g)
    tr, te = rows[: N * P * 4 // 5], rows[N * P * 4 // 5:]
    leaky = fit_probes(X[tr], y[tr], cfg)
    assert (leaky.predict(X[te])[:, 0] == y[te]).float().mean() > 0.9


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


def test_probe_plot(tmp_path):
    acts, labels = _planted(N=40, P=2, k=1)
    res = probe_activations(acts, {"a": labels, "b": (labels + 1) % 3}, ProbeConfig(max_iter=50))
    res.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


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


def test_labels_from_meta_per_position_and_strings():
    from interpkit.analyses.probing.linear import labels_from_meta
    from interpkit.tasks.base import PromptSet

    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    ps = PromptSet("t", ["x", "y"], ids, mask, torch.zeros(2, 1, dtype=torch.long),
                   meta={"states": [[3, 4], [1, 2, 3]], "name": ["b", "a"]})
    lab = labels_from_meta(ps, ["states"], "all")["states"]
    assert lab.tolist() == [[-1, 3, 4], [1, 2, 3]]
    assert labels_from_meta(ps, ["name"], "one")["name"].tolist() == [1, 0]


def test_entity_split_keeps_each_entity_on_one_side_and_stops_memorisation():
    """A label that belongs to an entity (a name's gender): prompts of one entity share a vector, so a
    prompt-level split lets the probe recognise entities it trained on; the entity-level split cannot."""
    from interpkit.analyses.probing.linear import group_split

    g = torch.Generator().manual_seed(0)
    E, per, d = 40, 5, 128
    groups = [f"name{e}" for e in range(E) for _ in range(per)]
    train, test = group_split(groups, 0.25, seed=1)
    assert {groups[i] for i in train.tolist()}.isdisjoint({groups[i] for i in test.tolist()})
    assert sorted(train.tolist() + test.tolist()) == list(range(E * per))
    assert len({groups[i] for i in test.tolist()}) == 10
    entity = torch.randn(E, d, generator=g)
    label_of = torch.randint(0, 2, (E,), generator=g)
    acts = (entity.repeat_interleave(per, 0) + 0.1 * torch.randn(E * per, d, generator=g))[:, None]   # [N, 1, d]
    labels = label_of.repeat_interleave(per)
    cfg = ProbeConfig(weight_decay=1e-4, max_iter=100)
    leaky = probe_activations(acts, {"gender": labels}, cfg)
    fair = probe_activations(acts, {"gender": labels}, cfg, groups=groups)
    assert leaky.test_acc[0, 0] > 0.9                     # seen entities: memorised, looks decodable
    assert fair.test_acc[0, 0] < 0.75                     # unseen entities: nothing general to decode
    with pytest.raises(Exception, match="at least 2 distinct"):
        group_split(["a"] * 5, 0.2, 0)
    # K-fold by entity: every entity tested exactly once, never in its own training set; same verdict
    from interpkit.analyses.probing.linear import group_folds

    folds = group_folds(groups, 5, seed=0)
    tested = torch.cat([te for _, te in folds]).sort().values
    assert torch.equal(tested, torch.arange(E * per))
    for tr, te in folds:
        assert {groups[i] for i in tr.tolist()}.isdisjoint({groups[i] for i in te.tolist()})
    cv = probe_activations(acts, {"gender": labels}, ProbeConfig(weight_decay=1e-4, max_iter=100, folds=5), groups=groups)
    assert cv.n_rows["gender"][1] == E * per and cv.test_acc[0, 0] < 0.75
    cv_leaky = probe_activations(acts, {"gender": labels}, ProbeConfig(weight_decay=1e-4, max_iter=100, folds=5))
    assert cv_leaky.test_acc[0, 0] > 0.9


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
