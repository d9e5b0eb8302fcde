"""Issue 18, SAEs: training as configured, the sae_lens layout, decoder-direction clustering."""
from __future__ import annotations

import json
import math

import pytest
import torch

from interpkit.analyses.sae.cluster import circle_fit, graph_clusters, labels_to_clusters, spectral_clusters
from interpkit.analyses.sae.load import SAE, SAESpec, load_sae, save_sae
from interpkit.analyses.sae.train import SAETrainConfig, calendar_text, collect, sae_stats, train_sae
from interpkit.errors import UserError
from tests.conftest import tiny


@pytest.fixture(scope="module")
def acts():
    lm = tiny("gpt2")
    return collect(lm, calendar_text(), layer=2, max_tokens=24, progress=False).acts


def _train(acts, **kw):
    cfg = SAETrainConfig(layer=2, width=96, steps=250, batch_size=128, lr=3e-3, **kw)
    spec = SAESpec(d_in=acts.shape[1], d_sae=cfg.width, architecture=cfg.architecture,
                   k=cfg.k if cfg.architecture == "topk" else None)
    return train_sae(acts, cfg, spec, progress=False)[0]


def test_topk_sae_l0_and_mse(acts):
    sae = _train(acts, architecture="topk", k=6)
    st = sae_stats(sae, acts)
    assert st.l0 == pytest.approx(6.0, abs=0.05)           # exactly k active (ties at 0 aside)
    untrained = SAE(sae.spec)
    untrained.init_weights(0, acts.mean(0))
    assert st.fvu < 0.5 < sae_stats(untrained, acts).fvu   # training explains most of the variance


def test_l1_sae_sparsity_follows_the_coefficient(acts):
    weak, strong = (sae_stats(_train(acts, architecture="standard", l1=c), acts) for c in (1e-4, 3e-2))
    assert strong.l0 < weak.l0 < 96
    assert weak.fvu < strong.fvu


def test_sae_lens_layout_round_trip(tmp_path, acts):
    sae = SAE(SAESpec(d_in=acts.shape[1], d_sae=32, architecture="topk", k=4, hook_name="blocks.2.hook_resid_pre"))
    sae.init_weights(1, acts.mean(0))
    save_sae(sae, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert back.spec.k == 4 and back.spec.hook_name == "blocks.2.hook_resid_pre"
    assert torch.equal(back(acts[:50])[0], sae(acts[:50])[0])
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())     # a public-style standard SAE
    cfg.pop("architecture"), cfg.update(activation_fn_str="relu", activation_fn_kwargs={})
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(tmp_path / "s").spec.architecture == "standard"
    with pytest.raises(UserError):
        load_sae(tmp_path)


def _planted(n_clusters=6, per=10, d=32, noise=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, d, generator=g)
    W = torch.cat([c + noise * c.norm() / math.sqrt(d) * torch.randn(per, d, generator=g) for c in centers])
    perm = torch.randperm(len(W), generator=g)
    truth = torch.arange(n_clusters).repeat_interleave(per)[perm]
    return W[perm], truth


def _same_partition(clusters, truth):
    return sorted(sorted(c) for c in clusters) == sorted(sorted((truth == k).nonzero().squeeze(1).tolist())
                                                          for k in truth.unique())


def test_spectral_clustering_recovers_planted_clusters():
    W, truth = _planted()
    assert _same_partition(labels_to_clusters(spectral_clusters(W, 6, seed=0), min_size=1), truth)
    assert _same_partition(graph_clusters(W, cutoff=0.5, top_k=None), truth)
    Wr, truth_r = _planted(noise=3.0)                   # no structure left: planted clusters not recovered
    assert not _same_partition(labels_to_clusters(spectral_clusters(Wr, 6, seed=0), min_size=1), truth_r)


def test_circle_search_tells_circles_from_noise():
    g = torch.Generator().manual_seed(0)
    vals = torch.randint(7, (300,), generator=g)
    ang = 2 * math.pi * vals / 7
    basis = torch.linalg.qr(torch.randn(16, 2, generator=g))[0]
    circle = torch.stack([ang.cos(), ang.sin()], 1) @ basis.T + 0.05 * torch.randn(300, 16, generator=g)
    noise = torch.randn(300, 16, generator=g)
    assert circle_fit(circle, vals, 7)["r2_heldout"] > 0.9
    assert circle_fit(noise, vals, 7)["r2_heldout"] < 0.3
