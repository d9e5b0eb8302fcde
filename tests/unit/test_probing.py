"""Probing without a model: planted features are found where planted, the split is prompt-level, labels from
metadata, entity splits (the model-side checks are tests/integration/test_probing.py)."""
from __future__ import annotations

import pytest
import torch

from interpkit.analyses.probing.linear import ProbeConfig, ProbeResult, fit_probes, probe_activations, prompt_split


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


def test_probe_plot(tmp_path):
    acts, labels = _planted(N=40, P=2, k=1)
    res = probe_activations(acts, {"a": labels, "b": (labels + 1) % 3}, ProbeConfig(max_iter=50))
    res.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


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
