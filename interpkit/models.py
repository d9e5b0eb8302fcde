"""Loading models: a hub id, a local directory, or a built-in ``tiny:<family>`` model.

Every model comes back as a ``LoadedModel``: the nnsight ``TransformersModel`` (with the uniform site
names of ``interpkit.families``), its ``Arch`` adapter and tokenizer. Tiny models have random weights
from a small config of the real architecture and a locally built tokenizer, so everything runs offline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from interpkit.arch import Arch
from interpkit.errors import UserError, first_line
from interpkit.families import FAMILIES, Family, family_for

TINY_SEED = 0


@dataclass
class LoadedModel:
    """An nnsight model plus what analyses need to know about it."""

    name: str
    model: object                    # nnsight TransformersModel
    arch: Arch
    tokenizer: object
    remote: bool | str = False       # True: NDIF; "local": nnsight's serialize round-trip, for tests
    revision: str | None = None

    @property
    def hf(self) -> torch.nn.Module:
        return self.arch.hf

    def __reduce__(self):
        # A trace block that names ``lm`` would ship the weights and tokenizer to NDIF and fail there
        # with an opaque whitelist error; say what to do instead.
        raise TypeError("a LoadedModel cannot be sent to NDIF: inside traces use the nnsight model "
                        "(model = lm.model) and plain values, not lm")


def tiny_config(family: str, vocab_size: int, *, n_layers: int = 3, d_model: int = 64, n_heads: int = 4):
    """A small config of the real architecture, from the family's ``Tiny`` record (GQA with 2 KV heads
    for the Llama-style families)."""
    import transformers

    tiny = _family(family).tiny
    sizes = dict(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                 n_kv_heads=n_heads // tiny.kv_groups, d_head=d_model // n_heads, d_ff=tiny.ffn_mult * d_model)
    return getattr(transformers, tiny.config)(**{k: sizes[v] for k, v in tiny.sizes.items()}, **tiny.fixed)


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown tiny model 'tiny:{name}'; use one of: {', '.join('tiny:' + f for f in FAMILIES)}")
    return FAMILIES[name]


def build_tiny(family: str, seed: int = TINY_SEED):
    """(hf_model, tokenizer) for ``tiny:<family>``: deterministic random weights and a local tokenizer."""
    from transformers import AutoModelForCausalLM

    from interpkit.tokenizers import build_tokenizer

    tok = build_tokenizer(_family(family).tokenizer)
    cfg = tiny_config(family, len(tok))
    cfg.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    hf.eval()
    hf.name_or_path = f"tiny:{family}"
    return hf, tok


def _load_hf(name: str, dtype: torch.dtype | None, device: str | None, revision: str | None):
    """A hub id or local directory as (hf_model, tokenizer), with one clear error per failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise UserError(f"{name!r} is a path but has no config.json; point at a saved HF model directory")
    src = str(local) if local.exists() else name
    offline = local.exists() or _cached(name, revision)
    if not offline and not hub_reachable():
        raise UserError(f"cannot download {name!r}: the Hugging Face hub is unreachable; "
                        f"use a local path or tiny:<family>")
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, local_files_only=offline)
        hf = AutoModelForCausalLM.from_pretrained(src, revision=revision, dtype=dtype or "auto",
                                                  attn_implementation="eager", device_map=device,
                                                  local_files_only=offline)
    except (OSError, ValueError, KeyError) as e:
        if local.exists():
            raise UserError(f"cannot load {name!r}: {first_line(e)}; point at a folder saved with "
                            f"save_pretrained (config.json, weights, tokenizer)") from None
        raise UserError(f"cannot download {name!r} (no network or unknown id); "
                        f"use a local path or tiny:<family>") from None
    hf.eval()
    return hf, tok


def load_model(name: str, *, remote: bool = False, dtype: torch.dtype | None = None,
               device: str | None = None, revision: str | None = None) -> LoadedModel:
    """Load ``name`` (hub id, local dir, ``.gguf`` file, built-in ``smollm2-135m`` or ``tiny:<family>``)
    as an nnsight model with uniform sites.

    ``remote=True`` keeps the weights off this machine for hub ids (NDIF runs them); analyses then send
    their traces with ``remote=True``.
    """
    from nnsight import TransformersModel
    from transformers.utils import logging as hf_logging

    from interpkit.validate import model_name

    model_name(name)                               # a missing folder is one line, not a hub lookup
    from interpkit.load_options import apply as apply_load_options, current as load_defaults

    dtype, device = load_defaults(dtype, device)   # the command's --dtype / --device when not given here
    hf_logging.disable_progress_bar()              # no per-load "Loading weights" bars in CLI output
    import warnings

    # the suffix engines hand a prefix cache over as past_key_values, which NDIF's transformers still
    # expects; local transformers 5.24 warns on every forward
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
    hf_logging.get_logger("transformers.utils.generic").setLevel("ERROR")
    if name.startswith("tiny:"):
        hf, tok = build_tiny(name.split(":", 1)[1])
        family = family_for(hf.config.model_type)
        model = TransformersModel(hf, tokenizer=tok, rename=family.rename)
        model.repo_id = name
        import nnsight.modeling.huggingface as nhf
        nhf._ID_CACHE.setdefault(name, name)        # tiny ids are not on the hub: no lookup for remote keys
    elif remote and not Path(name).expanduser().exists() and not _is_local_kind(name):
        model, family = _remote_meta(name, revision)
        hf, tok = model._model, model.tokenizer
    else:
        hf, tok = _load_hf(local_source(name), dtype, device, revision)
        family = family_for(hf.config.model_type)
        model = TransformersModel(hf, tokenizer=tok, rename=family.rename)
        model.repo_id = name
    apply_load_options(hf, dtype, device)          # tiny and converted models too; not weightless remote ones
    arch = Arch.from_hf(hf, family)
    from interpkit.remote.config import check_versions, ensure_shipped

    ensure_shipped()                               # our trace helpers travel by value (NDIF lacks them)
    if remote is True:
        from interpkit.remote.status import check_model_running

        check_versions(name)                       # stop early, in one line, on client/server skew
        check_model_running(getattr(model, "repo_id", None) or name, revision)   # and when NDIF does not run it
    return LoadedModel(name=name, model=model, arch=arch, tokenizer=tok, remote=remote, revision=revision)


def local_source(name: str) -> str:
    """What to load for ``name``: built-in real models and ``.gguf`` files become their converted, cached
    folder (``interpkit.gguf``); anything else is returned as is (hub id or local directory)."""
    from interpkit import gguf

    if name in gguf.BUILTIN:
        return str(gguf.converted_dir(gguf.resolve_builtin(name), log=_stderr))
    if name.lower().endswith(".gguf"):
        return str(gguf.converted_dir(Path(name), log=_stderr))
    return name


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def _remote_meta(name: str, revision: str | None):
    """A weightless (meta) model for NDIF: only the config and tokenizer come from the hub."""
    from nnsight import TransformersModel
    from transformers import AutoConfig

    if not _cached(name, revision) and not hub_reachable():
        raise UserError(f"cannot download the config of {name!r}: the Hugging Face hub is unreachable "
                        f"(remote runs need it for the config and tokenizer); use tiny:<family> offline")
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except OSError:
        raise UserError(f"cannot download the config of {name!r} (no network, unknown or gated id; "
                        f"gated repos need HF_TOKEN); use a local path or tiny:<family>") from None
    family: Family = family_for(config.model_type)
    model = TransformersModel(name, revision=revision, rename=family.rename, dispatch=False,
                              attn_implementation="eager")
    return model, family


def _is_local_kind(name: str) -> bool:
    from interpkit.gguf import BUILTIN

    return name in BUILTIN or name.lower().endswith(".gguf")


def _cached(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except HFValidationError:
        raise UserError(f"{name!r} is neither an existing model folder nor a valid hub id; pass a folder with "
                        f"config.json, a hub id such as gpt2, or tiny:<family>") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be reached at all (fails in seconds instead of minutes of retries)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
