"""Published circuits as data, for precision / recall / F1 of traced circuits (``graphs.compare``).

- ``ioi-gpt2-wang2022``: GPT-2 small IOI, Wang, Variengien, Conmy, Shlegeris & Steinhardt (2022),
  "Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small",
  arXiv:2211.00593 (ICLR 2023), Figure 2 and Section 3: 26 attention heads found by path patching.
  Franco & Crovella (2025) compare against these heads only (MLPs excluded) and report precision 0.576,
  recall 0.731, F1 0.644 (at |delta logit diff| >= 0.2).
- ``gt-gpt2-hanna2023``: GPT-2 small Greater-Than, Hanna, Liu & Variengien (2023), "How does GPT-2 compute
  greater-than?: Interpreting mathematical abilities in a pre-trained language model", arXiv:2305.00586
  (NeurIPS 2023), Section 3 (path patching): heads 5.1, 5.5, 6.1, 6.9, 7.10, 8.8, 8.11, 9.1 and MLPs 8-11.
  Franco & Crovella compare with the MLPs included: P 0.400, R 1.000, F1 0.571.
- ``gp-gpt2-mathwin2023``: GPT-2 small Gender-Pronoun, the ACDC circuit of Mathwin, Corlouer, Kran, Barez &
  Nanda (2023), "Identifying a preliminary circuit for predicting gendered pronouns in GPT-2 small"
  (the 8 heads and 8 MLPs as listed in Franco & Crovella's ``circuit_comparison.py``, which is the
  baseline of their GP numbers: P 0.414, R 0.750, F1 0.533, with MLPs).

Entries are (layer, head) or (layer, "MLP"). ``TASK_REFERENCES`` gives the references of a task.
"""
from __future__ import annotations

from interpkit.errors import UserError

IOI_GPT2_WANG2022: dict[str, list[tuple[int, int]]] = {
    "name mover": [(9, 9), (10, 0), (9, 6)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative name mover": [(10, 7), (11, 10)],
    "s-inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}

GT_GPT2_HANNA2023: dict[str, list] = {
    "attention heads": [(5, 1), (5, 5), (6, 1), (6, 9), (7, 10), (8, 8), (8, 11), (9, 1)],
    "MLPs": [(8, "MLP"), (9, "MLP"), (10, "MLP"), (11, "MLP")],
}

GP_GPT2_MATHWIN2023: dict[str, list] = {
    "attention heads": [(0, 4), (1, 10), (1, 9), (4, 3), (6, 0), (7, 1), (9, 7), (10, 9)],
    "MLPs": [(0, "MLP"), (1, "MLP"), (3, "MLP"), (4, "MLP"), (5, "MLP"), (7, "MLP"), (10, "MLP"), (11, "MLP")],
}

REFERENCES: dict[str, dict[str, list]] = {
    "ioi-gpt2-wang2022": IOI_GPT2_WANG2022,
    "gt-gpt2-hanna2023": GT_GPT2_HANNA2023,
    "gp-gpt2-mathwin2023": GP_GPT2_MATHWIN2023,
}
TASK_REFERENCES = {"ioi": ["ioi-gpt2-wang2022"], "gt": ["gt-gpt2-hanna2023"], "gp": ["gp-gpt2-mathwin2023"]}
INCLUDE_MLP = {"ioi-gpt2-wang2022": False, "gt-gpt2-hanna2023": True, "gp-gpt2-mathwin2023": True}


def reference_components(name: str, include_mlp: bool | None = None) -> set:
    """The (layer, head) — and (layer, "MLP") — set of a published circuit, or of a file with one
    "layer.head" or "layer.MLP" per line. ``include_mlp=None``: as Franco & Crovella compare (MLPs for GT
    and GP, not for IOI path patching)."""
    if name in REFERENCES:
        comps = {c for part in REFERENCES[name].values() for c in part}
        use_mlp = INCLUDE_MLP.get(name, False) if include_mlp is None else include_mlp
    else:
        comps, use_mlp = _read_file(name), bool(include_mlp)
    return {c for c in comps if use_mlp or c[1] != "MLP"}


def reference_heads(name: str) -> set[tuple[int, int]]:
    """The (layer, head) set of a published circuit (or file), MLPs excluded."""
    return reference_components(name, include_mlp=False)


def _read_file(name: str) -> set:
    from pathlib import Path

    path = Path(name)
    if not path.exists():
        raise UserError(f"unknown reference circuit {name!r}; use one of {', '.join(REFERENCES)} "
                        f"or a file with one 'layer.head' (or 'layer.MLP') per line")
    out = set()
    for line in path.read_text().split():
        try:
            layer, head = line.split(".")
            out.add((int(layer), "MLP" if head.upper() == "MLP" else int(head)))
        except ValueError:
            raise UserError(f"{path}: bad entry {line!r}; write one 'layer.head' (e.g. 9.9) per line") from None
    return out
