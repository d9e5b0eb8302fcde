"""Family differences are data: one ``Family`` record per architecture in ``interpkit/families.py`` and no
branching on a family's name anywhere else; every record builds its tiny model and names real modules."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from interpkit.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("interpkit", "analyses", "tasks")
# families.py holds the records; training.py's ``arch`` option takes "gpt2"/"neox" as a user's choice
EXEMPT = {"interpkit/families.py", "analyses/state_tracking/training.py"}


def _name_pattern() -> re.Pattern:
    """A quoted family name or HF model type compared with (==, !=), tested for membership in a literal
    collection, matched by ``case``, or used as a dict key: the ways code branches on a family."""
    names = {f.name for f in FAMILIES.values()} | {t for f in FAMILIES.values() for t in f.model_types}
    q = r"""["'](?:%s)["']""" % "|".join(sorted(map(re.escape, names)))
    return re.compile(rf"""(?:==|!=)\s*{q}|{q}\s*(?:==|!=)|\bin\s*[(\[{{][^)\]}}]*{q}|\bcase\s+{q}|{q}\s*:""")


def _scanned_files() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))] + [ROOT / "cli.py"]
    return [p for p in files if p.relative_to(ROOT).as_posix() not in EXEMPT]


def _offenders(text: str) -> list[str]:
    pat = _name_pattern()
    return [f"{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if pat.search(line)]


def test_the_scan_catches_family_branches():
    """The pattern flags each way of branching on a name and leaves passing a name as an argument alone."""
    caught = ['if fam.name == "gpt2":', "x = a if 'gemma2' != family else b", 'if family in ("gpt2", "neox"):',
              '    case "llama":', '{"mistral": 1}[family]', 'if cfg.model_type == "gpt_neox":']
    allowed = ['tiny_config("gpt2", len(tok))', 'def train(*, family: str = "gpt2"):', 'load_model("tiny:llama")']
    assert all(_offenders(line) for line in caught)
    assert not any(_offenders(line) for line in allowed)


def test_no_family_name_branches_outside_families_py():
    files = _scanned_files()
    assert len(files) > 20 and ROOT / "interpkit" / "arch.py" in files
    found = [f"{p.relative_to(ROOT)}:{hit}" for p in files for hit in _offenders(p.read_text())]
    assert not found, "branching on a family name; describe the difference in interpkit/families.py:\n  " + \
        "\n  ".join(found)


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
