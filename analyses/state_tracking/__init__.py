"""Permutation state tracking (seed 000): training small models, length generalisation, the AA/PAA signature: `interpkit train`, `eval`, `data`."""
