"""Every ``Family`` record in ``interpkit/families.py`` builds its tiny model and names real modules (that
no code branches on a family's name is tests/unit/test_families.py)."""
from __future__ import annotations

import functools

import pytest

from interpkit.families import FAMILIES


def _resolves(pattern: str, modules: dict) -> bool:
    """Whether an nnsight rename key (``*.x`` = any path ending in x) names a module of the model."""
    key = pattern.removeprefix("*.")
    return any(n == key or n.endswith("." + key) for n in modules)


@functools.lru_cache(maxsize=None)
def _tiny_hf(name: str):
    from interpkit.models import build_tiny

    return build_tiny(name)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_record_matches_its_tiny_model(name):
    """Each record's tiny model builds, its model type maps back to the record, every rename target and
    module path resolves, and the tokenizer is the record's style."""
    from interpkit.arch import QK_READERS, Arch
    from interpkit.families import TINY_SIZES, family_for
    from interpkit.tokenizers import STYLES

    fam = FAMILIES[name]
    assert fam.qk_layout in QK_READERS and fam.tokenizer in STYLES and fam.norm in ("layernorm", "rmsnorm")
    assert set(fam.tiny.sizes.values()) <= set(TINY_SIZES)
    hf, tok = _tiny_hf(name)
    assert family_for(hf.config.model_type) is fam
    modules = dict(hf.named_modules())
    for target in set(fam.rename.values()):                    # NeoX names its unembedding two ways
        assert any(_resolves(p, modules) for p, t in fam.rename.items() if t == target), (name, target)
    arch = Arch.from_hf(hf, fam)
    for layer in range(arch.n_layers):
        attn = arch.attn_module(layer)
        assert arch.block(layer) is modules[f"{fam.decoder}.{fam.blocks}.{layer}"]
        assert all(hasattr(attn, p) for p in fam.qkv) and arch.o_proj(layer) is getattr(attn, fam.o_proj)
        assert arch.attn_norm(layer).weight.shape == (arch.d_model,)
        assert (arch.post_attn_norm(layer) is None) == (fam.post_attn_norm is None)
    assert arch.final_norm().weight.shape == (arch.d_model,)
    assert (arch.softcap(0) is None) == (fam.softcap_attr is None)
    bos = "<s>" if fam.tokenizer == "sentencepiece" else "<|endoftext|>"
    assert tok.bos_token == bos
    assert (tok("a b").input_ids[0] == tok.bos_token_id) == (fam.tokenizer == "sentencepiece")
