"""Activation and attribution patching against independent plain-PyTorch references, on every tiny family.

The reference implementations below use only torch forward hooks on the raw HF modules, one forward per
cell (and torch.autograd for gradients): nothing of nnsight or of the batched engine.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from interpkit.analyses.patching.attribution import agreement, run_attribution
from interpkit.analyses.patching.sweep import PatchConfig, PatchResult, run_patching
from interpkit import metrics as M
from interpkit.errors import UserError
from interpkit.tasks.base import PromptSet
from tests.conftest import FAMILIES, tiny

P, T = 3, 6
SITE_CASES = [("resid_pre", "position"), ("resid_post", "position"), ("attn_out", "position"),
              ("mlp_out", "position"), ("head_out", "position"), ("head_out", "head"), ("unembed_in", "position")]



def random_pairs(lm, seed: int = 0, same: bool = False) -> PromptSet:
    """P random prompts (row 0 left-padded by one) and corrupted copies differing at two positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(lm.tokenizer), (P, T), generator=g)
    mask = torch.ones_like(ids)
    ids[0, 0], mask[0, 0] = lm.tokenizer.pad_token_id, 0
    bad = ids.clone()
    if not same:
        bad[:, 2] = torch.randint(10, len(lm.tokenizer), (P,), generator=g)
        bad[:, 4] = torch.randint(10, len(lm.tokenizer), (P,), generator=g)
    answer = torch.randint(10, len(lm.tokenizer), (P, 1), generator=g)
    wrong = torch.randint(10, len(lm.tokenizer), (P, 2), generator=g)
    wrong[0, 1] = -1
    return PromptSet(task="random", prompts=["x"] * P, input_ids=ids, attention_mask=mask, answer_ids=answer,
                     wrong_ids=wrong, corrupted_prompts=["y"] * P, corrupted_ids=bad, corrupted_mask=mask.clone(),
                     roles={"end": torch.full((P,), T - 1)})


# -- the plain-PyTorch reference ----------------------------------------------------------------------
def raw_module(lm, site: str, layer: int) -> tuple[torch.nn.Module, str]:
    """(raw HF module, "pre" | "post") whose hook sees ``site`` of ``layer``."""
    hf, arch = lm.hf, lm.arch
    if site == "unembed_in":
        base = getattr(hf, "transformer", None) or getattr(hf, "gpt_neox", None) or hf.model
        norm = getattr(base, "ln_f", None) or getattr(base, "final_layer_norm", None) or base.norm
        return norm, "post"
    block, attn = arch.block(layer), arch.attn_module(layer)
    if site == "head_out":
        return (getattr(attn, "c_proj", None) or getattr(attn, "dense", None) or attn.o_proj), "pre"
    return {"resid_pre": (block, "pre"), "resid_post": (block, "post"), "attn_out": (attn, "post"),
            "mlp_out": (block.mlp, "post")}[site]


def hooked_forward(lm, inputs: dict, site: str, layer: int, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of a plain HF forward, with ``edit(act) -> act`` applied at the site, and the
    site activation as the model saw it ([B, T, D]; head_out: [B, T, H*dh])."""
    module, kind = raw_module(lm, site, layer)
    seen = {}

    def swap(x):
        x = edit(x) if edit is not None else x
        seen["act"] = x
        return x

    if kind == "pre":
        def hook(mod, args, kwargs):
            if args:
                return (swap(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, out):
            return (swap(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else swap(out)
        handle = module.register_forward_hook(hook)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)   # left padding keeps true positions
    try:
        logits = lm.hf(**{**inputs, "position_ids": positions}).logits[:, -1]
    finally:
        handle.remove()
    return logits, seen["act"]


def region(cfg: PatchConfig, cell: int, n_heads: int) -> torch.Tensor:
    """Bool mask [T, H] (per-head sites) or [T, 1] of what a cell replaces."""
    pos = torch.arange(T)
    if cfg.by == "head":
        return (torch.arange(n_heads) == cell)[None, :].expand(T, n_heads)
    keep = {"position": pos == cell, "prefix": pos <= cell, "suffix": pos >= cell}[cfg.region]
    return keep[:, None].expand(T, n_heads if cfg.site == "head_out" else 1)


def base_and_source(prompts: PromptSet, cfg: PatchConfig) -> tuple[dict, dict]:
    """The run patched into (base) and the run patched from (source): denoising patches clean into corrupted."""
    clean, corrupt = prompts.batch(), prompts.batch(corrupted=True)
    return (corrupt, clean) if cfg.direction == "denoise" else (clean, corrupt)


def reference_sweep(lm, prompts: PromptSet, cfg: PatchConfig) -> torch.Tensor:
    """values [P, layers, cells] with one hooked forward per cell."""
    H = lm.arch.n_heads
    base, source = base_and_source(prompts, cfg)
    metric = lambda logits: M.logit_diff(logits, prompts.answer_ids, prompts.wrong_ids)  # noqa: E731
    layers = [lm.arch.n_layers] if cfg.site == "unembed_in" else list(range(lm.arch.n_layers))
    cells = list(range(H)) if cfg.by == "head" else list(range(T))
    out = torch.zeros(P, len(layers), len(cells))
    with torch.no_grad():
        for li, layer in enumerate(layers):
            src = hooked_forward(lm, source, cfg.site, layer)[1]
            for ci, cell in enumerate(cells):
                m = region(cfg, cell, H)

                def edit(x):
                    shaped = x.view(P, T, H, -1) if cfg.site == "head_out" else x.unsqueeze(2)
                    fill = torch.zeros_like(shaped) if cfg.mode == "deletion" else src.view_as(shaped)
                    return torch.where(m[None, :, :, None], fill, shaped).view_as(x)

                out[:, li, ci] = metric(hooked_forward(lm, base, cfg.site, layer, edit)[0])
    return out


# -- exact patching ---------------------------------------------------------------------------------
@pytest.mark.parametrize("site, by", SITE_CASES)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_matches_hook_reference(lm, site, by, direction):
    prompts = random_pairs(lm)
    cfg = PatchConfig(site=site, by=by, direction=direction, max_rows=20)     # several chunks per sweep
    res = run_patching(lm, prompts, cfg)
    ref = reference_sweep(lm, prompts, cfg)
    assert res.values.shape == ref.shape and res.timings["forwards"] > 1
    assert (res.values - ref).abs().max().item() < 1e-5
    base_logits = hooked_forward(lm, prompts.batch(corrupted=direction == "denoise"), "resid_pre", 0)[0]
    assert (res.base - M.logit_diff(base_logits, prompts.answer_ids, prompts.wrong_ids)).abs().max() < 1e-5


@pytest.mark.parametrize("region_mode, mode", [("prefix", "substitution"), ("suffix", "deletion")])
def test_exact_regions_and_deletion_match_reference(region_mode, mode):
    lm = tiny("llama")
    prompts = random_pairs(lm, seed=1)
    cfg = PatchConfig(site="resid_post", region=region_mode, mode=mode)
    assert (run_patching(lm, prompts, cfg).values - reference_sweep(lm, prompts, cfg)).abs().max() < 1e-5


def test_clean_into_clean_is_identity(lm):
    prompts = random_pairs(lm, same=True)
    for site, by in SITE_CASES:
        res = run_patching(lm, prompts, PatchConfig(site=site, by=by))
        assert (res.values - res.base[:, None, None]).abs().max().item() < 1e-5, site
        assert res.normalized.isnan().all()                # source == base: nothing to normalise by


def test_full_patch_at_last_layer_restores_source(lm):
    prompts = random_pairs(lm)
    res = run_patching(lm, prompts, PatchConfig(site="resid_post", region="prefix", layers=[lm.arch.n_layers - 1]))
    assert (res.values[:, 0, -1] - res.source).abs().max() < 1e-5      # prefix through the end = everything
    assert torch.allclose(res.clean_normalized[:, 0, -1], torch.ones(P), atol=1e-4)


@pytest.mark.parametrize("site", ["resid_pre", "head_out"])
def test_prefix_reuse_equals_full_sweep(lm, site):
    prompts = random_pairs(lm)
    for direction, rows in (("denoise", 6), ("noise", 9)):
        cfg = PatchConfig(site=site, direction=direction, max_rows=rows)
        full = run_patching(lm, prompts, replace(cfg, engine="full"))
        fast = run_patching(lm, prompts, cfg)
        assert (full.values - fast.values).abs().max().item() < 1e-5
        assert (full.source - fast.source).abs().max().item() < 1e-5


@pytest.mark.parametrize("site, by, region, mode", [
    ("resid_post", "position", "position", "substitution"), ("attn_out", "position", "prefix", "substitution"),
    ("mlp_out", "position", "suffix", "deletion"), ("head_out", "head", "position", "substitution"),
    ("unembed_in", "position", "position", "substitution"), ("resid_pre", "position", "window", "substitution")])
def test_engine_equals_full_engine_for_every_site(site, by, region, mode):
    """Every site kind, region and mode on the prefix engine equals the plain reference engine."""
    for family in ("gpt2", "llama"):
        lm = tiny(family)
        prompts = random_pairs(lm, seed=2)
        cfg = PatchConfig(site=site, by=by, region=region, mode=mode, window=2, max_rows=7)
        full, fast = run_patching(lm, prompts, replace(cfg, engine="full")), run_patching(lm, prompts, cfg)
        assert (full.values - fast.values).abs().max().item() < 1e-5, family
        assert (full.base - fast.base).abs().max().item() < 1e-5


def test_plan_skips_exactly_the_cells_before_the_first_difference():
    """Cells before the first differing token are skipped (their value is the base run's, bit for bit),
    so are last-layer writes away from the last position; everything else is computed."""
    from interpkit.engine.plan import SweepSpec, plan_sweep

    T, L = 6, 3
    first = torch.tensor([2, 4])
    spec = SweepSpec(site="resid_post", layers=list(range(L)), n_layers=L, cell_masks=torch.eye(T, dtype=torch.bool),
                     first_diff=first, max_rows=5)
    plan = plan_sweep(spec)
    for p in range(2):
        for layer in range(L):
            for t in range(T):
                expect = t < first[p] or (layer == L - 1 and t != T - 1)
                assert bool(plan.skipped[p, layer, t]) == expect, (p, layer, t)
    rows = sum(c.n_rows for c in plan.chunks)
    assert rows == int((~plan.skipped).sum()) and all(c.n_rows <= 5 for c in plan.chunks)
    assert all(c.p0 >= int(first.min()) for c in plan.chunks) and 0 < plan.work < 0.5
    lm = tiny("neox")
    prompts = random_pairs(lm, seed=3)
    res = run_patching(lm, prompts, PatchConfig(site="resid_pre"))
    assert res.skipped.any() and torch.equal(res.values[res.skipped],
                                             res.base[:, None, None].expand_as(res.values)[res.skipped])


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_tail_leaves_the_read_logits_and_skips_the_rest(family):
    """``MlpTail`` (what suffix runs use at the last layer): the last position's logits equal the plain
    forward's, the MLP output at the kept positions is the plain one, and zero (not computed) elsewhere."""
    from interpkit.engine.inside import Forward, MlpTail, Readout, trace_forward

    lm = tiny(family)
    L, T = lm.arch.n_layers, 7
    ids = torch.randint(5, 60, (3, T), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    readout = Readout("logit_diff", torch.tensor([[7], [8], [9]]), torch.tensor([[10], [11], [12]]),
                      records=[("mlp_out", L - 1)])
    plain, _, (mlp_plain,) = trace_forward(lm.model, Forward(inputs, readout, []))
    for k in (1, 3):
        tail, _, (mlp_tail,) = trace_forward(lm.model, Forward(inputs, readout, [MlpTail(L - 1, k)]))
        assert (plain - tail).abs().max().item() < 1e-5
        assert (mlp_tail[:, -k:] - mlp_plain[:, -k:]).abs().max().item() < 1e-5
        assert mlp_tail[:, :-k].abs().max().item() == 0.0 and mlp_plain[:, :-k].abs().max().item() > 0


# -- attribution patching -------------------------------------------------------------------------
def test_attribution_is_exact_on_the_linear_site(lm):
    """unembed_in -> logits is linear and logit difference is linear in the logits (Gemma-2's final logit
    softcap is switched off for this test: with it the map is tanh, not linear)."""
    prompts = random_pairs(lm)
    cap = getattr(lm.hf.config, "final_logit_softcapping", None)
    lm.hf.config.final_logit_softcapping = None
    try:
        for direction in ("denoise", "noise"):
            cfg = PatchConfig(site="unembed_in", direction=direction)
            exact, approx = run_patching(lm, prompts, cfg), run_attribution(lm, prompts, cfg)
            assert isinstance(approx, PatchResult) and approx.method == "attribution"
            assert (exact.values - approx.values).abs().max().item() < 1e-5
            assert (approx.values[:, 0, -1] - approx.source).abs().max().item() < 1e-5
            assert agreement(exact, approx, k=3)["pearson"] > 0.999
    finally:
        lm.hf.config.final_logit_softcapping = cap


def reference_attribution(lm, prompts: PromptSet, cfg: PatchConfig) -> torch.Tensor:
    """(a_source - a_base) . dm/da per (pair, layer, cell), with torch.autograd on hooked activations."""
    H = lm.arch.n_heads
    base, source = base_and_source(prompts, cfg)
    out = torch.zeros(P, lm.arch.n_layers, H if cfg.by == "head" else T)
    for layer in range(lm.arch.n_layers):
        with torch.no_grad():
            src = hooked_forward(lm, source, cfg.site, layer)[1]
        logits, act = hooked_forward(lm, base, cfg.site, layer)
        grad, = torch.autograd.grad(M.logit_diff(logits, prompts.answer_ids, prompts.wrong_ids).sum(), act)
        prod = ((src - act) * grad).detach()
        if cfg.site == "head_out":
            prod = prod.view(P, T, H, -1).sum(-1)
            out[:, layer] = prod.sum(1) if cfg.by == "head" else prod.sum(2)
        else:
            out[:, layer] = prod.sum(-1)
    return out


@pytest.mark.parametrize("site, by", [("resid_pre", "position"), ("attn_out", "position"), ("mlp_out", "position"),
                                      ("head_out", "head"), ("head_out", "position")])
def test_attribution_matches_autograd_reference(lm, site, by):
    prompts = random_pairs(lm)
    cfg = PatchConfig(site=site, by=by, max_rows=4)                        # two traces (pairs chunked)
    approx = run_attribution(lm, prompts, cfg)
    ref = reference_attribution(lm, prompts, cfg)
    assert approx.timings["forwards"] == 2
    assert (approx.values - approx.base[:, None, None] - ref).abs().max().item() < 1e-5


def test_attribution_regions_sum_positions():
    lm = tiny("gpt2")
    prompts = random_pairs(lm)
    one = run_attribution(lm, prompts, PatchConfig(site="resid_pre"))
    pre = run_attribution(lm, prompts, PatchConfig(site="resid_pre", region="prefix"))
    d = lambda r: r.values - r.base[:, None, None]  # noqa: E731
    assert (d(pre) - d(one).cumsum(-1)).abs().max() < 1e-5


# -- remote: the whole sweep is one request --------------------------------------------------------
def _as_remote(lm, remote):
    return replace(lm, remote=remote)


@pytest.mark.parametrize("method", [run_patching, run_attribution])
def test_remote_local_roundtrip_equals_local(method):
    lm = tiny("gpt2")
    prompts = random_pairs(lm)
    cfg = PatchConfig(site="resid_pre", max_rows=20 if method is run_patching else 4)
    local = method(lm, prompts, cfg)
    remote = method(_as_remote(lm, "local"), prompts, cfg)
    assert (local.values - remote.values).abs().max().item() == 0.0


@pytest.mark.parametrize("method", [run_patching, run_attribution])
def test_loopback_ndif_single_request(method):
    """The whole sweep is one request, and its results equal a local run made under the server's
    conditions: NDIF (and the loopback) freeze the weights, and with frozen weights PyTorch may pick
    another matmul kernel (last-position logits differ by ~1e-7 from a run with trainable weights)."""
    pytest.importorskip("interpkit.remote.loopback")
    lm = tiny("gpt2")
    prompts = random_pairs(lm)
    cfg = PatchConfig(site="head_out", by="head", max_rows=8 if method is run_patching else 4)
    local, remote = frozen_and_loopback(method, lm, prompts, cfg)   # attribution: gradients from the embeddings
    assert local.timings["forwards"] > 1
    assert (local.values - remote.values).abs().max().item() == 0.0
    assert (method(lm, prompts, cfg).values - remote.values).abs().max().item() < 1e-6


def test_prefix_reuse_through_loopback_is_one_request():
    """The prefix-reuse sweep runs as one session: one request, the base run's cache kept on the server."""
    lm = tiny("llama")
    prompts = random_pairs(lm)
    cfg = PatchConfig(site="resid_pre", max_rows=6)
    local, remote = frozen_and_loopback(run_patching, lm, prompts, cfg)
    assert local.timings["forwards"] > 3
    assert torch.equal(local.values, remote.values) and torch.equal(local.base, remote.base)
    assert (run_patching(lm, prompts, replace(cfg, engine="full")).values - remote.values).abs().max().item() < 1e-5


def frozen_and_loopback(method, lm, prompts: PromptSet, cfg: PatchConfig) -> tuple[PatchResult, PatchResult]:
    """``method`` run locally with frozen weights (as the server runs it), then through a loopback NDIF server,
    which must receive exactly one request: (local result, remote result)."""
    from interpkit.remote import loopback

    with loopback.frozen(lm.hf):
        local = method(lm, prompts, cfg)
    with loopback.LoopbackNDIF(lm.model) as server:
        before = server.n_requests
        remote = method(_as_remote(lm, True), prompts, cfg)
        assert server.n_requests - before == 1
    return local, remote


# -- bad options --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(site="resid"), "site 'resid'"),
    (dict(site="resid_pre", by="head"), "--by head needs --site head"),
    (dict(layers=[7]), "layer 7 is out of range"),
    (dict(positions=[T]), f"position {T} is out of range"),
    (dict(site="unembed_in", layers=[0]), "single layer"),
    (dict(direction="sideways"), "direction 'sideways'"),
    (dict(metric="margin"), "margin metric needs candidate"),
])
@pytest.mark.parametrize("method", [run_patching, run_attribution])
def test_bad_options_raise_user_error(kwargs, message, method):
    lm = tiny("gpt2")
    with pytest.raises(UserError, match=message):
        method(lm, random_pairs(lm), PatchConfig(**kwargs))


def test_unpaired_or_misaligned_prompts_raise_user_error():
    lm = tiny("gpt2")
    prompts = random_pairs(lm)
    unpaired = PromptSet(task="x", prompts=prompts.prompts, input_ids=prompts.input_ids,
                         attention_mask=prompts.attention_mask, answer_ids=prompts.answer_ids)
    with pytest.raises(UserError, match="no corrupted prompts"):
        run_patching(lm, unpaired, PatchConfig())
    prompts.corrupted_ids, prompts.corrupted_mask = prompts.corrupted_ids[:, 1:], prompts.corrupted_mask[:, 1:]
    with pytest.raises(UserError, match="differ in token length"):
        run_attribution(lm, prompts, PatchConfig())


# -- the CLI body: store, resume, figures ----------------------------------------------------------
def stored_values(summary: dict, method: str = "exact"):
    """The assembled ``values`` of ``method`` in a finished ``patch_command`` run, read through its run
    store (results.h5, group ``result/<method>``, checksums verified)."""
    import json

    from interpkit.store import RunStore

    run = Path(summary["run_dir"])
    m = json.loads((run / "manifest.json").read_text())
    store = RunStore("patching", m["config"], model=m["model"]["name"], seed=m["seed"], root=run.parents[1],
                     run_id=run.name, readonly=True)
    return store.read_result(method)["values"]


def test_patch_command_stores_resumes_and_plots(tmp_path, monkeypatch):
    from interpkit.analyses.patching.command import patch_command
    from interpkit.engine import inside as engine
    from interpkit.store import RunStore

    kw = dict(task="gp", model="tiny:gpt2", site="resid", method="both", n=4, max_rows=12, root=str(tmp_path / "a"))
    real_write = RunStore.write_chunk

    def killed_after_one(self, chunk, arrays, seconds=None):
        if self.done_chunks():
            raise RuntimeError("killed")
        real_write(self, chunk, arrays, seconds)

    monkeypatch.setattr(RunStore, "write_chunk", killed_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        patch_command(**kw, echo=lambda line: None)
    monkeypatch.setattr(RunStore, "write_chunk", real_write)

    traces, real_trace = [], engine.trace_suffix
    monkeypatch.setattr(engine, "trace_suffix", lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    lines = []
    resumed = patch_command(**kw, echo=lines.append)
    n_resumed = len(traces)
    fresh = patch_command(**{**kw, "root": str(tmp_path / "b")}, echo=lambda line: None)
    n_fresh = len(traces) - n_resumed
    assert n_fresh > 2 and n_resumed == n_fresh - 1              # the first chunk came from the store
    for method in ("exact", "attribution"):
        assert (stored_values(resumed, method) == stored_values(fresh, method)).all()
    assert set(resumed["agreement"]) >= {"pearson", "top10_overlap"}
    assert all(__import__("os").path.exists(f) for f in resumed["figures"]) and len(resumed["figures"]) == 4
    assert any("attribution vs exact" in line for line in lines) and any("[end]" in line for line in lines)
    assert any(line.endswith("results.h5 (result/exact, result/attribution)") for line in lines)
    assert sorted(p.name for p in Path(resumed["run_dir"]).glob("*.h5")) == ["results.h5"]


def test_patch_command_prefix_reuse_equals_engine(tmp_path, monkeypatch):
    from interpkit.analyses.patching.command import patch_command

    kw = dict(task="gp", model="tiny:llama", site="mlp", n=3, echo=lambda line: None)
    a = patch_command(**kw, root=str(tmp_path / "a"), engine="full")
    b = patch_command(**kw, root=str(tmp_path / "b"))
    assert abs(stored_values(a) - stored_values(b)).max() < 1e-5
    import interpkit.engine.inside as inside

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a stored sweep")

    monkeypatch.setattr(inside, "trace_suffix", refuse)
    old_copy = Path(b["run_dir"]) / "result.h5"
    old_copy.write_bytes(b"\x89HDF\r\n garbage")             # the separate file earlier versions wrote
    again = patch_command(**kw, root=str(tmp_path / "b"))     # resumes from the store
    assert again["run_dir"] == b["run_dir"] and (stored_values(again) == stored_values(b)).all()
    assert not old_copy.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="fast"), "unknown --method 'fast'"),
    (dict(site="embed"), "unknown --site 'embed'"),
    (dict(task="nosuchtask"), "unknown task 'nosuchtask'"),
    (dict(by="head"), "--by head needs --site head"),
])
def test_patch_command_bad_options(kwargs, message, tmp_path):
    from interpkit.analyses.patching.command import patch_command

    args = {"task": "gp", "model": "tiny:gpt2", "n": 2, "root": str(tmp_path), **kwargs}
    with pytest.raises(UserError, match=message):
        patch_command(**args, echo=lambda line: None)


def test_family_list_is_complete():
    """The tests' family list (every ``lm`` fixture) is the library's table: a newly added family is tested.
    That each record builds its tiny model and names real modules is ``tests/integration/test_families.py``."""
    from interpkit.families import FAMILIES as RECORDS

    assert FAMILIES == list(RECORDS)
