"""Family differences are data: one ``Family`` record per architecture in ``interpkit/families.py`` and no
branching on a family's name anywhere else (that every record builds its tiny model and names real modules
is tests/integration/test_families.py)."""
from __future__ import annotations

import re
from pathlib import Path

from interpkit.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
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
