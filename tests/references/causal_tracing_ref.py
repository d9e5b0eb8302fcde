"""An independent causal-tracing implementation with plain PyTorch forward hooks, the way ROME does it:
one forward (clean row + S corrupted rows) per restoration, severed runs in two passes.

It shares nothing with ``analyses/causal_tracing/trace.py`` except the noise tensor it is handed; the tests
compare the two, and ``bench/bench_causal_tracing.py`` times it as the one-forward-per-restoration loop.
"""
from __future__ import annotations

import contextlib

import torch


def hf_blocks(hf):
    """The transformer blocks of a Hugging Face causal LM, found by attribute name (as ROME does)."""
    base = getattr(hf, "transformer", None) or getattr(hf, "gpt_neox", None) or hf.model
    return base.h if hasattr(base, "h") else base.layers


def _attn(block):
    return getattr(block, "attn", None) or getattr(block, "attention", None) or block.self_attn


def _tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _hooks(pairs):
    handles = [m.register_forward_hook(fn) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _copy_from_row0(pos):
    def hook(module, args, out):
        x = _tensor(out)
        x[1:, pos] = x[0, pos]
    return hook


def _hold(pos, saved):
    def hook(module, args, out):
        _tensor(out)[1:, pos] = saved
    return hook


def _record(pos, store, key):
    def hook(module, args, out):
        store[key] = _tensor(out)[1:, pos].clone()
    return hook


def _add_noise(a, b, noise):
    def hook(module, args, out):
        out = out.clone()
        out[1:, a:b + 1] += noise.to(out.dtype)
        return out
    return hook


class ReferenceTracer:
    """ROME's procedure for one fact on a raw HF causal LM (batch = 1 clean + S corrupted rows)."""

    def __init__(self, hf, ids: torch.Tensor, subject: tuple[int, int], noise: torch.Tensor, answer: int | None = None):
        self.hf, self.ids, self.noise = hf, ids, noise
        self.a, self.b = subject
        self.S = noise.shape[0]
        self.blocks = hf_blocks(hf)
        self.L = len(self.blocks)
        self.answer = answer if answer is not None else int(self._probs(())[0].argmax())

    def _run(self, extra):
        batch = self.ids[None].repeat(self.S + 1, 1)
        embed = self.hf.get_input_embeddings()
        with torch.no_grad(), _hooks([(embed, _add_noise(self.a, self.b, self.noise))] + list(extra)):
            return self.hf(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[:, -1].float().softmax(-1)

    def _probs(self, extra):
        return self._run(extra)

    def score(self, extra) -> float:
        """Mean answer probability over the corrupted rows with the given hooks."""
        return float(self._run(extra)[1:, self.answer].mean())

    def high_low(self) -> tuple[float, float]:
        p = self._run(())[:, self.answer]
        return float(p[0]), float(p[1:].mean())

    def hidden(self, t: int, layer: int) -> float:
        return self.score([(self.blocks[layer], _copy_from_row0(t))])

    def window(self, kind: str, t: int, layer: int, window: int) -> float:
        lo = max(0, layer - window // 2)
        hi = min(self.L, layer - window // 2 + window)
        mods = [self.blocks[j].mlp if kind == "mlp" else _attn(self.blocks[j]) for j in range(lo, hi)]
        return self.score([(m, _copy_from_row0(t)) for m in mods])

    def severed(self, kind: str, t: int, layer: int) -> float:
        """Pass 1: corrupted run, record token t's MLP/attn outputs in every layer. Pass 2: restore h_t^(layer)
        and hold those outputs at their recorded corrupted values."""
        mods = [self.blocks[j].mlp if kind == "mlp" else _attn(self.blocks[j]) for j in range(self.L)]
        saved: dict[int, torch.Tensor] = {}
        self._run([(m, _record(t, saved, j)) for j, m in enumerate(mods)])
        hold = [(m, _hold(t, saved[j])) for j, m in enumerate(mods)]
        return self.score(hold + [(self.blocks[layer], _copy_from_row0(t))])

    def table(self, kinds: list[str], window: int) -> torch.Tensor:
        """[K, T, L] restored scores, one forward per (kind, token, layer)."""
        T = self.ids.shape[0]
        out = torch.zeros(len(kinds), T, self.L)
        for k, kind in enumerate(kinds):
            for t in range(T):
                for l in range(self.L):
                    if kind == "hidden":
                        out[k, t, l] = self.hidden(t, l)
                    elif kind in ("mlp", "attn"):
                        out[k, t, l] = self.window(kind, t, l, window)
                    else:
                        out[k, t, l] = self.severed(kind.split("_")[1], t, l)
        return out
