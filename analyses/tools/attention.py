"""Attention patterns: per head for chosen prompts, role-to-role attention averaged over a task, where one
position attends to on average, and detectors for previous-token, duplicate-token and induction heads.

Everything is one trace per call (one NDIF request remotely) that sends back only what is asked for.

Detectors (as TransformerLens's ``detect_head``): a batch of random token sequences repeated once,
[BOS] r_1..r_n r_1..r_n. A head's score is its mean attention, over the destinations where the pattern is
defined, to the source the pattern names: previous token d -> d-1 (every d >= 1 of the sequence body);
duplicate token d -> d-n and induction d -> d-n+1 (every d in the second copy). Uniform attention scores
about 1/(d+1); a head is flagged above ``threshold`` (default 0.4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.analyses.tools.common import check_layers, encode, run_traces
from interpkit.analyses.tools.reads import read_pattern
from interpkit.errors import UserError
from interpkit.plots import pyplot, save_cropped

DETECTORS = ("previous_token", "duplicate_token", "induction")


def trace_role_attention(model, inputs: dict, layers: list[int], dest: torch.Tensor, src: torch.Tensor | None,
                         remote=False):
    """Per layer: A[b, :, dest_b, src_b] ([B, H]) or, without ``src``, the whole row A[b, :, dest_b, :]."""
    with model.trace(inputs, remote=remote):
        out = list().save()
        rows = torch.arange(dest.shape[0])
        for layer in layers:
            A = read_pattern(model, layer).float()
            picked = A[rows, :, dest]                                     # [B, H, T]
            if src is not None:
                picked = picked.gather(-1, src[:, None, None].expand(-1, picked.shape[1], 1))[..., 0]
            out.append(picked.detach().cpu())
    return out


def _positions(prompts, role: str, B: int, T: int) -> torch.Tensor:
    if role in ("end", "last") and role not in getattr(prompts, "roles", {}):
        return torch.full((B,), T - 1, dtype=torch.long)
    roles = getattr(prompts, "roles", {}) or {}
    if role not in roles:
        raise UserError(f"unknown role {role!r}; this task has roles: {', '.join(['end'] + list(roles))}")
    return roles[role].long()


@dataclass
class RoleAttention:
    """Mean attention from role ``dest`` to role ``src`` per layer and head (and per prompt)."""

    dest: str
    src: str
    layers: list[int]
    per_prompt: torch.Tensor        # [B, layers, heads]

    @property
    def mean(self) -> torch.Tensor:
        return self.per_prompt.mean(0)

    def top(self, k: int = 10) -> list[dict]:
        m = self.mean
        flat = m.flatten().topk(min(k, m.numel()))
        return [{"layer": self.layers[i // m.shape[1]], "head": i % m.shape[1], "attention": round(float(v), 4)}
                for v, i in zip(flat.values.tolist(), flat.indices.tolist())]


def role_attention_call(lm, prompts, dest: str, src: str, layers: list[int] | None = None):
    """(trace call, finish) of ``role_attention``, for running several calls as one request."""
    layers = check_layers(lm, layers)
    inputs = encode(lm, prompts)
    B, T = inputs["input_ids"].shape
    d, s = _positions(prompts, dest, B, T), _positions(prompts, src, B, T)
    return ((trace_role_attention, (inputs, layers, d, s)),
            lambda out: RoleAttention(dest=dest, src=src, layers=layers, per_prompt=torch.stack(list(out), 1)))


def role_attention(lm, prompts, dest: str, src: str, layers: list[int] | None = None) -> RoleAttention:
    """Attention from ``dest`` to ``src`` (role names of the PromptSet, e.g. end -> IO, S2 -> S1)."""
    call, finish = role_attention_call(lm, prompts, dest, src, layers)
    return finish(run_traces(lm, [call])[0])


@dataclass
class DestProfile:
    """Attention from one role to every position: [B, layers, heads, src], positions absolute (left-padded)."""

    dest: str
    layers: list[int]
    per_prompt: torch.Tensor

    def by_layer(self) -> torch.Tensor:
        """[layers, src]: mean over prompts and heads."""
        return self.per_prompt.mean((0, 2))


def dest_profile_call(lm, prompts, dest: str = "end", layers: list[int] | None = None):
    """(trace call, finish) of ``dest_profile``."""
    layers = check_layers(lm, layers)
    inputs = encode(lm, prompts)
    B, T = inputs["input_ids"].shape
    d = _positions(prompts, dest, B, T)
    return ((trace_role_attention, (inputs, layers, d, None)),
            lambda out: DestProfile(dest=dest, layers=layers, per_prompt=torch.stack(list(out), 1)))


def dest_profile(lm, prompts, dest: str = "end", layers: list[int] | None = None) -> DestProfile:
    """Which earlier positions ``dest`` attends to, per layer and head (for equal-length prompts this is
    position-aligned; with padding, positions are in padded coordinates)."""
    call, finish = dest_profile_call(lm, prompts, dest, layers)
    return finish(run_traces(lm, [call])[0])


# -- head detectors -------------------------------------------------------------------------------------
def repeated_tokens(lm, n_tokens: int = 20, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, int]:
    """[batch, (BOS) + 2 n] random tokens repeated once, from the non-special vocabulary; and the BOS offset."""
    tok = lm.tokenizer
    V = lm.hf.config.vocab_size
    special = set(getattr(tok, "all_special_ids", []) or [])
    pool = torch.tensor([i for i in range(min(V, len(tok) if hasattr(tok, "__len__") else V)) if i not in special])
    if pool.numel() < 2:
        raise UserError("the tokenizer has no ordinary tokens to draw random sequences from")
    gen = torch.Generator().manual_seed(seed)
    body = pool[torch.randint(pool.numel(), (batch, n_tokens), generator=gen)]
    ids = torch.cat([body, body], 1)
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("a")["input_ids"][:1] == [bos]
    if adds_bos:
        ids = torch.cat([torch.full((batch, 1), bos, dtype=torch.long), ids], 1)
    return ids, int(adds_bos)


def trace_detectors(model, inputs: dict, layers: list[int], n: int, offset: int, remote=False):
    """Per layer [3, H] scores: previous-token, duplicate-token, induction."""
    with model.trace(inputs, remote=remote):
        out = list().save()
        T = inputs["input_ids"].shape[1]
        body = torch.arange(offset + 1, T)                     # destinations with a previous body token
        second = torch.arange(offset + n, T)                   # destinations in the second copy
        for layer in layers:
            A = read_pattern(model, layer).float()              # [B, H, T, T]
            prev = A[:, :, body, body - 1].mean((0, 2))
            dup = A[:, :, second, second - n].mean((0, 2))
            ind = A[:, :, second, second - n + 1].mean((0, 2))
            out.append(torch.stack([prev, dup, ind]).detach().cpu())
    return out


@dataclass
class HeadScores:
    """Detector scores [detector, layer, head] on repeated random tokens."""

    layers: list[int]
    scores: torch.Tensor
    threshold: float

    def detected(self, detector: str) -> list[tuple[int, int]]:
        i = DETECTORS.index(detector)
        hits = (self.scores[i] > self.threshold).nonzero().tolist()
        return [(self.layers[l], h) for l, h in hits]

    def table(self) -> list[dict]:
        L, H = self.scores.shape[1:]
        return [{"layer": self.layers[l], "head": h, **{d: round(float(self.scores[i, l, h]), 4)
                                                        for i, d in enumerate(DETECTORS)}}
                for l in range(L) for h in range(H)]


def detect_heads_call(lm, n_tokens: int = 20, batch: int = 8, seed: int = 0, threshold: float = 0.4,
                      layers: list[int] | None = None):
    """(trace call, finish) of ``detect_heads``."""
    if n_tokens < 2:
        raise UserError("--n-tokens must be >= 2 (the repeated sequence needs a body)")
    layers = check_layers(lm, layers)
    ids, offset = repeated_tokens(lm, n_tokens, batch, seed)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return ((trace_detectors, (inputs, layers, n_tokens, offset)),
            lambda out: HeadScores(layers=layers, scores=torch.stack(list(out), 1), threshold=threshold))


def detect_heads(lm, n_tokens: int = 20, batch: int = 8, seed: int = 0, threshold: float = 0.4,
                 layers: list[int] | None = None) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head (one trace)."""
    call, finish = detect_heads_call(lm, n_tokens, batch, seed, threshold, layers)
    return finish(run_traces(lm, [call])[0])


# -- figures -------------------------------------------------------------------------------------------
def _layer_heatmap(matrix: torch.Tensor, layers: list[int], columns: list[str], xlabel: str, path, title: str,
                   label: str, figsize: tuple[float, float], vmax: float | None = None, rotation: int = 0) -> str:
    """A layer x ``columns`` heatmap (viridis from 0), saved to ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=rotation, fontsize=7)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    return save_cropped(fig, path)


def plot_heads(matrix: torch.Tensor, layers: list[int], path, title: str, label: str, vmax: float | None = None) -> str:
    """A layer x head heatmap."""
    L, H = matrix.shape
    return _layer_heatmap(matrix, layers, [str(h) for h in range(H)], "head", path, title, label,
                          (max(3.5, 0.35 * H + 2), max(2.5, 0.3 * L + 1.3)),
                          vmax=vmax or max(float(matrix.max()), 1e-6))


def plot_patterns(A: torch.Tensor, tokens: list[str], layer: int, path) -> str:
    """One prompt's attention patterns at one layer, a panel per head ([H, T, T], padding removed)."""
    plt = pyplot()
    H, T = A.shape[0], A.shape[-1]
    cols = min(H, 4)
    rows = (H + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * max(2.5, 0.25 * T), rows * max(2.5, 0.25 * T)),
                             squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(A[h].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{layer}H{h}", fontsize=8)
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(T), tokens, fontsize=5)
    fig.tight_layout()
    return save_cropped(fig, path)


def plot_profile(prof: torch.Tensor, layers: list[int], labels: list[str], path, title: str) -> str:
    """Layer x source-position heatmap of mean attention from one position."""
    L, T = prof.shape
    return _layer_heatmap(prof, layers, labels, "source position", path, title,
                          "attention (mean over heads and prompts)", (max(4.0, 0.35 * T + 2), max(2.5, 0.35 * L + 1.3)),
                          rotation=90)
