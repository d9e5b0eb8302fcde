"""The sparse autoencoder module and the sae_lens on-disk layout (``cfg.json`` + ``sae_weights.safetensors``).

``SAE`` covers the three common architectures: ``standard`` (ReLU, trained with an L1 penalty), ``topk``
(keep the k largest pre-activations) and ``jumprelu`` (ReLU gated by a per-latent threshold). Weights
follow sae_lens: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; the encoder
subtracts b_dec first. ``save_sae`` writes the layout, ``load_sae`` reads it (from our runs or a public
SAE downloaded when online), so the cluster analysis works on either.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from interpkit.errors import UserError

WEIGHTS = "sae_weights.safetensors"
ARCHS = ("standard", "topk", "jumprelu")


@dataclass
class SAESpec:
    """What defines an SAE besides its weights (written to cfg.json in sae_lens field names)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = 16                     # topk only
    hook_name: str = ""                    # e.g. "resid_pre.6" (ours) or "blocks.7.hook_resid_pre"
    hook_layer: int = -1
    model_name: str = ""
    extra: dict = field(default_factory=dict)


class SAE(torch.nn.Module):
    def __init__(self, spec: SAESpec) -> None:
        super().__init__()
        if spec.architecture not in ARCHS:
            raise UserError(f"unknown SAE architecture {spec.architecture!r}; use one of {', '.join(ARCHS)}")
        if spec.architecture == "topk" and not (spec.k and 1 <= spec.k <= spec.d_sae):
            raise UserError(f"topk SAE needs 1 <= k <= d_sae ({spec.d_sae}), got k={spec.k}")
        self.spec = spec
        self.W_enc = torch.nn.Parameter(torch.zeros(spec.d_in, spec.d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(spec.d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(spec.d_sae, spec.d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(spec.d_in))
        self.threshold = torch.nn.Parameter(torch.zeros(spec.d_sae), requires_grad=False)

    def init_weights(self, seed: int = 0, mean: torch.Tensor | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose, b_dec = data mean."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            W = torch.randn(self.spec.d_sae, self.spec.d_in, generator=g)
            self.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            if mean is not None:
                self.b_dec.copy_(mean)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.spec.architecture == "topk":
            vals, idx = pre.topk(self.spec.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if self.spec.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.relu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Write cfg.json + sae_weights.safetensors (sae_lens layout)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = sae.spec
    cfg = {"d_in": s.d_in, "d_sae": s.d_sae, "architecture": s.architecture, "hook_name": s.hook_name,
           "hook_layer": s.hook_layer, "model_name": s.model_name, "dtype": "float32",
           "activation_fn_str": "topk" if s.architecture == "topk" else "relu",
           "activation_fn_kwargs": {"k": s.k} if s.architecture == "topk" else {}, "apply_b_dec_to_input": True,
           "interpkit": s.extra}
    tensors = {k: v.detach().contiguous() for k, v in sae.state_dict().items()
               if k != "threshold" or s.architecture == "jumprelu"}
    save_file(tensors, str(folder / WEIGHTS))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))
    return folder


def load_sae(folder: str | Path) -> SAE:
    """An SAE from a sae_lens-layout folder (cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "cfg.json").exists() or not (folder / WEIGHTS).exists():
        raise UserError(f"{folder} is not an SAE folder: it needs cfg.json and {WEIGHTS} (sae_lens layout)")
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        w = load_file(str(folder / WEIGHTS))
    except (json.JSONDecodeError, OSError, Exception) as e:  # safetensors raises its own error type
        raise UserError(f"cannot read the SAE in {folder}: {str(e).splitlines()[0]}") from None
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in w]
    if missing:
        raise UserError(f"{folder / WEIGHTS} lacks {', '.join(missing)}")
    arch = cfg.get("architecture", "standard")
    kw = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn_str") == "topk" or arch == "topk":
        arch = "topk"
    d_in, d_sae = w["W_enc"].shape
    spec = SAESpec(d_in=d_in, d_sae=d_sae, architecture=arch, k=kw.get("k") if arch == "topk" else None,
                   hook_name=cfg.get("hook_name", ""), hook_layer=int(cfg.get("hook_layer", -1)),
                   model_name=cfg.get("model_name", ""), extra=cfg.get("interpkit", {}))
    sae = SAE(spec)
    state = {k: w[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    state["threshold"] = w["threshold"].float() if "threshold" in w else torch.zeros(d_sae)
    sae.load_state_dict(state)
    return sae.eval()


def sae_layer(sae: SAE, n_layers: int) -> int:
    """The residual index (0 = embeddings, l = output of block l-1) an SAE reads, from its hook name."""
    import re

    name = sae.spec.hook_name
    m = re.search(r"(\d+)", name)
    if m is None:
        raise UserError(f"cannot tell the layer of SAE hook {name!r}; pass --layer")
    layer = int(m.group(1))
    if "resid_post" in name:
        layer += 1
    if not 0 <= layer <= n_layers:
        raise UserError(f"SAE hook {name!r} is at layer {layer}, outside 0..{n_layers}")
    return layer


def describe(sae: SAE) -> dict:
    return {**asdict(sae.spec), "n_params": sum(p.numel() for p in sae.parameters())}
