"""The acceptance tier: a smoke test against the real NDIF (one remote trace on ``INTERPKIT_NDIF_MODEL``,
default openai-community/gpt2). It only runs when ``NDIF_API_KEY`` is set and the hub is reachable; the
remote layer itself is tested against the loopback server in tests/integration/test_remote.py."""
from __future__ import annotations

import os

import pytest
import torch

from interpkit.remote import check_versions, ensure_shipped

LIVE_MODEL = os.environ.get("INTERPKIT_NDIF_MODEL", "openai-community/gpt2")


@pytest.mark.skipif(not os.environ.get("NDIF_API_KEY") or os.environ.get("HF_HUB_OFFLINE", "0") == "1",
                    reason="live NDIF smoke test: needs NDIF_API_KEY, network, and hub access "
                           "(export NDIF_API_KEY=... HF_HUB_OFFLINE=0; model from INTERPKIT_NDIF_MODEL)")
def test_live_ndif_smoke(monkeypatch):
    from nnsight import CONFIG, TransformersModel

    # the real host and key, even while a loopback fixture is up (restored afterwards)
    monkeypatch.setattr(CONFIG.API, "HOST", os.environ.get("NDIF_HOST", "https://api.ndif.us"))
    monkeypatch.setattr(CONFIG.API, "APIKEY", os.environ["NDIF_API_KEY"])
    check_versions(LIVE_MODEL)                      # a mismatch fails here, with the pip fix
    ensure_shipped()
    remote = TransformersModel(LIVE_MODEL, dispatch=False)
    with remote.trace("The Eiffel Tower is in the city of", remote=True):
        h = remote.transformer.h[0].output[:, -1].save()
        logits = remote.lm_head.output[:, -1].save()
    assert logits.shape[-1] == remote.config.vocab_size and torch.isfinite(h).all()
