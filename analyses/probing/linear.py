"""Linear probing of the residual stream, layer by layer.

Three steps, each usable on its own:

1. ``collect_residuals``: the residual stream at every layer -- index 0 is the embedding output (the
   input of block 0), index ``l`` the output of block ``l - 1`` -- at chosen positions (every position,
   the last one, or per-row positions such as a task's roles), in batched traces of ``chunk_rows`` rows.
   Remotely the chunks are one NDIF request (a session); the trace code is the same.
2. ``probe_activations``: logistic-regression probes (torch, full-batch L-BFGS or Adam, L2 weight
   decay, deterministic) fitted independently at every layer, with a **prompt-level** split: all the
   positions of one prompt are in train or all in test, so position-wise probes cannot leak a prompt's
   state across the split.
3. ``probe_layers`` / ``lengthwise_probe``: the two state-tracking views (per-layer accuracy of several
   targets; final-position accuracy as a layer x sequence-length matrix). Both are task-agnostic: the
   caller supplies labels, or a function producing prompts of a given length.

Labels are integer class tensors (any values; they are re-indexed), ``-1`` marks positions to ignore.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from interpkit.engine.run import run_session
from interpkit.errors import UserError
from interpkit.plots import finish, pyplot
from interpkit.remote import ensure_shipped
from interpkit.sites import site

IGNORE = -1


# ----------------------------------------------------------------------------------------------------
# 1. activations
# ----------------------------------------------------------------------------------------------------
def model_inputs(prompts) -> dict[str, torch.Tensor]:
    """Model inputs from a PromptSet, a dict of tensors, or an [N, T] tensor of ids."""
    if hasattr(prompts, "batch"):
        return prompts.batch()
    if isinstance(prompts, torch.Tensor):
        return {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    if isinstance(prompts, dict) and "input_ids" in prompts:
        ids = prompts["input_ids"]
        return {"input_ids": ids, "attention_mask": prompts.get("attention_mask", torch.ones_like(ids))}
    raise UserError("probing needs a PromptSet, a dict with input_ids/attention_mask, or an id tensor")


def position_index(inputs: dict, positions) -> tuple[torch.Tensor, bool]:
    """([N, P] positions to read, squeeze) for "all", "last", an [N] or an [N, P] tensor of positions."""
    N, T = inputs["input_ids"].shape
    if isinstance(positions, str):
        if positions == "all":
            return torch.arange(T).expand(N, T).clone(), False
        if positions == "last":
            return torch.full((N, 1), T - 1), True
        raise UserError(f"positions {positions!r}: use 'all', 'last' or a tensor of positions")
    pos = torch.as_tensor(positions, dtype=torch.long)
    squeeze = pos.dim() == 1
    pos = pos[:, None] if squeeze else pos
    if pos.shape[0] != N or pos.min() < 0 or pos.max() >= T:
        raise UserError(f"positions must be [N] or [N, P] with N={N} rows and values in 0..{T - 1}")
    return pos, squeeze


def trace_residuals(model, inputs: dict, pos: torch.Tensor, n_layers: int, remote: bool = False):
    """Residuals [B, n_layers + 1, P, d] at ``pos`` [B, P] of one batch. Runs unchanged on NDIF."""
    with model.trace(inputs, remote=remote, logits_to_keep=1):
        rows = torch.arange(pos.shape[0])[:, None]
        acts = list().save()
        acts.append(site(model, "resid_pre", 0)[rows, pos].detach().cpu())
        for layer in range(n_layers):
            acts.append(site(model, "resid_post", layer)[rows, pos].detach().cpu())
    return acts


def collect_residuals(lm, prompts, positions="all", *, chunk_rows: int = 64,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Residual stream [N, n_layers + 1, (P,) d_model] of ``prompts`` at ``positions``.

    ``positions`` is "all" (every padded position; P = T), "last" (squeezed), an [N] tensor (squeezed;
    e.g. a role of a PromptSet) or an [N, P] tensor. Rows go through the model ``chunk_rows`` at a time;
    with ``lm.remote`` (True: NDIF; "local": nnsight's serialisation round trip) all chunks are one
    session, i.e. one request.
    """
    inputs = model_inputs(prompts)
    pos, squeeze = position_index(inputs, positions)
    N = pos.shape[0]
    jobs = []
    for s in range(0, N, chunk_rows):
        sl = slice(s, s + chunk_rows)
        jobs.append(({k: v[sl] for k, v in inputs.items()}, pos[sl]))
    n_layers = lm.arch.n_layers
    if lm.remote:
        ensure_shipped()
        outs = run_session(lm.model, trace_residuals, [(x, p, n_layers) for x, p in jobs], lm.remote)
    else:
        with torch.no_grad():
            outs = [trace_residuals(lm.model, x, p, n_layers) for x, p in jobs]
    acts = torch.cat([torch.stack([a.to(dtype) for a in out], 1) for out in outs], 0)
    return acts[:, :, 0] if squeeze else acts


# ----------------------------------------------------------------------------------------------------
# 2. probes
# ----------------------------------------------------------------------------------------------------
@dataclass
class ProbeConfig:
    """How probes are fitted; every field is a CLI option."""

    test_frac: float = 0.2
    seed: int = 0
    optimizer: str = "lbfgs"          # lbfgs (full batch, strong Wolfe) | adam (full batch)
    weight_decay: float = 1e-3        # L2 penalty on the weights (features are standardised)
    max_iter: int = 300
    lr: float | None = None           # default 1.0 for L-BFGS, 0.01 for Adam
    standardize: bool = True
    max_train_rows: int | None = 50_000   # subsample train rows (positions) beyond this, seeded
    chunk_rows: int = 64              # rows per forward when collecting activations
    folds: int = 1                    # > 1: K-fold cross-validation over prompts (or groups); every row tested once

    def validate(self) -> None:
        if not 0.0 < self.test_frac < 1.0:
            raise UserError(f"test_frac {self.test_frac} must be in (0, 1)")
        if self.optimizer not in ("lbfgs", "adam"):
            raise UserError(f"optimizer {self.optimizer!r}: use lbfgs or adam")
        if self.weight_decay < 0 or self.max_iter < 1:
            raise UserError("weight_decay must be >= 0 and max_iter >= 1")
        if self.folds < 1:
            raise UserError(f"--folds must be >= 1 (got {self.folds})")


def prompt_split(n_prompts: int, test_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted (train, test) prompt indices; at least one prompt on each side."""
    if n_prompts < 2:
        raise UserError(f"probing needs at least 2 prompts for a train/test split, got {n_prompts}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_prompts, generator=g)
    n_test = min(n_prompts - 1, max(1, round(test_frac * n_prompts)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _by_group(groups: list, in_test) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) prompt indices: a prompt is tested when ``in_test(its group)``."""
    test = torch.tensor([i for i, g in enumerate(groups) if in_test(g)], dtype=torch.long)
    train = torch.tensor([i for i, g in enumerate(groups) if not in_test(g)], dtype=torch.long)
    return train, test


def group_split(groups: list, test_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) prompt indices with every group (e.g. a name) wholly on one side, so a probe cannot
    pass by recognising an entity it saw in training; about ``test_frac`` of the groups are held out."""
    names = sorted(set(groups), key=str)
    if len(names) < 2:
        raise UserError(f"an entity-level split needs at least 2 distinct values, got {len(names)}")
    held = {names[int(i)] for i in prompt_split(len(names), test_frac, seed)[1]}
    return _by_group(groups, held.__contains__)


def group_folds(groups: list, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K (train, test) splits with every group wholly on one side and every group tested exactly once."""
    names = sorted(set(groups), key=str)
    if len(names) < k:
        raise UserError(f"{k} folds need at least {k} distinct groups, got {len(names)}; use fewer --folds")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {names[j]: r % k for r, j in enumerate(order)}
    return [_by_group(groups, lambda g, f=f: fold_of[g] == f) for f in range(k)]


def _rows(acts: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor):
    """Flatten prompts x positions into rows (X [n, L, d], y [n]) for the given prompts, dropping -1."""
    a, y = acts[prompts], labels[prompts]
    if a.dim() == 4:                                   # [n, L, P, d] with labels [n, P]
        a = a.permute(0, 2, 1, 3).reshape(-1, a.shape[1], a.shape[3])
        y = y.reshape(-1)
    keep = y != IGNORE
    return a[keep], y[keep]


@dataclass
class LinearProbes:
    """One multinomial logistic probe per layer: logits = ((x - mean) / std) @ W[l] + b[l]."""

    W: torch.Tensor                   # [L, d, C]
    b: torch.Tensor                   # [L, C]
    mean: torch.Tensor                # [L, d]
    std: torch.Tensor                 # [L, d]
    classes: torch.Tensor             # [C] the label value of each class index

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """[n, L, d] -> [n, L, C]."""
        Z = (X.float() - self.mean) / self.std
        return torch.einsum("nld,ldc->nlc", Z, self.W) + self.b

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Predicted label values [n, L]."""
        return self.classes[self.logits(X).argmax(-1)]


def fit_probes(X: torch.Tensor, y: torch.Tensor, cfg: ProbeConfig, classes: torch.Tensor | None = None) -> LinearProbes:
    """Fit independent logistic probes at every layer of X [n, L, d] on labels y [n] (values)."""
    X = X.float()
    classes = torch.unique(y) if classes is None else classes
    target = torch.searchsorted(classes, y)
    n, L, d = X.shape
    if cfg.standardize:
        mean, std = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(L, d), torch.ones(L, d)
    Z = (X - mean) / std
    W = torch.zeros(L, d, len(classes), requires_grad=True)
    b = torch.zeros(L, len(classes), requires_grad=True)

    def loss_fn():
        logits = torch.einsum("nld,ldc->nlc", Z, W) + b
        ce = torch.nn.functional.cross_entropy(logits.reshape(n * L, -1), target.repeat_interleave(L), reduction="sum")
        return ce / n + cfg.weight_decay * W.pow(2).sum()     # sum over layers of independent objectives

    with torch.enable_grad():
        if cfg.optimizer == "lbfgs":
            opt = torch.optim.LBFGS([W, b], lr=cfg.lr or 1.0, max_iter=cfg.max_iter, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

            def closure():
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss
            opt.step(closure)
        else:
            opt = torch.optim.Adam([W, b], lr=cfg.lr or 0.01)
            for _ in range(cfg.max_iter):
                opt.zero_grad()
                loss_fn().backward()
                opt.step()
    return LinearProbes(W=W.detach(), b=b.detach(), mean=mean, std=std, classes=classes)


@dataclass
class ProbeResult:
    """Per-target, per-layer probe accuracy. Layer 0 = embedding output, layer l = output of block l-1."""

    targets: list[str]
    layers: list[int]
    train_acc: torch.Tensor           # [targets, layers]
    test_acc: torch.Tensor            # [targets, layers]
    chance: torch.Tensor              # [targets] best constant guess: the largest class share of the test rows
                                      # (the train majority scored 0.000 when a split held no row of it)
    train_prompts: torch.Tensor       # prompt indices used for training (disjoint from test_prompts)
    test_prompts: torch.Tensor
    n_rows: dict = field(default_factory=dict)   # {target: (n_train_rows, n_test_rows)}
    config: ProbeConfig | None = None
    timings: dict = field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"target": t, "layer": l, "train_acc": float(self.train_acc[i, j]),
                              "test_acc": float(self.test_acc[i, j]), "chance": float(self.chance[i])}
                             for i, t in enumerate(self.targets) for j, l in enumerate(self.layers)])

    def best_layer(self, target: str) -> int:
        return self.layers[int(self.test_acc[self.targets.index(target)].argmax())]

    def plot(self, path=None, title: str = "linear probe accuracy"):
        """Test accuracy vs layer, one line per target (train dashed, chance dotted)."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, t in enumerate(self.targets):
            line, = ax.plot(self.layers, self.test_acc[i].numpy(), marker="o", label=f"{t} (test)")
            ax.plot(self.layers, self.train_acc[i].numpy(), ls="--", color=line.get_color(), alpha=0.5)
            ax.axhline(float(self.chance[i]), ls=":", color=line.get_color(), alpha=0.6)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(self.layers)
        ax.set_title(title)
        ax.legend(fontsize=8)
        return finish(fig, path)


def probe_activations(acts: torch.Tensor, labels: dict[str, torch.Tensor], cfg: ProbeConfig | None = None,
                      groups: list | None = None) -> ProbeResult:
    """Probe every layer of ``acts`` for every target in ``labels``.

    acts: [N, L, d] with labels [N], or [N, L, P, d] with labels [N, P] (-1 = ignore). The split is over
    the N prompts, or over ``groups`` (one value per prompt, e.g. its name: ``group_split``).
    """
    cfg = cfg or ProbeConfig()
    cfg.validate()
    N, L = acts.shape[:2]
    if cfg.folds > 1:
        splits = group_folds(groups if groups is not None else list(range(N)), cfg.folds, cfg.seed)
    else:
        splits = [prompt_split(N, cfg.test_frac, cfg.seed) if groups is None else group_split(groups, cfg.test_frac, cfg.seed)]
    shape = (len(labels), L)
    train_acc, test_acc, chance = torch.zeros(shape), torch.zeros(shape), torch.zeros(len(labels))
    n_rows, t0 = {}, time.perf_counter()
    for i, (name, lab) in enumerate(labels.items()):
        lab = torch.as_tensor(lab, dtype=torch.long)
        if lab.shape != acts.shape[:1] + acts.shape[2:-1]:
            raise UserError(f"labels {name!r} have shape {tuple(lab.shape)}; expected "
                            f"{tuple(acts.shape[:1] + acts.shape[2:-1])} to match the activations")
        classes = torch.unique(lab[lab != IGNORE])
        correct, tested, seen, all_test = torch.zeros(L), 0, 0, []
        for train_p, test_p in splits:
            Xtr, ytr = _rows(acts, lab, train_p)
            Xte, yte = _rows(acts, lab, test_p)
            if len(ytr) == 0 or len(yte) == 0:
                raise UserError(f"target {name!r} has no labelled rows in train or test; check the labels")
            if cfg.max_train_rows is not None and len(ytr) > cfg.max_train_rows:
                keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_train_rows]
                Xtr, ytr = Xtr[keep], ytr[keep]
            probes = fit_probes(Xtr, ytr, cfg, classes if cfg.folds > 1 else None)
            train_acc[i] += (probes.predict(Xtr) == ytr[:, None]).float().mean(0) / len(splits)
            correct += (probes.predict(Xte) == yte[:, None]).float().sum(0)
            tested, seen = tested + len(yte), seen + len(ytr)
            all_test.append(yte)
        test_acc[i] = correct / tested
        yte = torch.cat(all_test)
        chance[i] = torch.unique(yte, return_counts=True)[1].max().float() / len(yte)   # best constant guess
        n_rows[name] = (seen // len(splits), tested)
    train_p, test_p = splits[0] if len(splits) == 1 else (torch.zeros(0, dtype=torch.long), torch.arange(N))
    return ProbeResult(targets=list(labels), layers=list(range(L)), train_acc=train_acc, test_acc=test_acc,
                       chance=chance, train_prompts=train_p, test_prompts=test_p, n_rows=n_rows, config=cfg,
                       timings={"fit_s": time.perf_counter() - t0})


# ----------------------------------------------------------------------------------------------------
# 3. state-tracking conveniences
# ----------------------------------------------------------------------------------------------------
def _final_labels(lab, N: int) -> torch.Tensor:
    lab = torch.as_tensor(lab, dtype=torch.long)
    return lab[:, -1] if lab.dim() == 2 else lab.reshape(N)


def probe_layers(lm, prompts, labels: dict[str, torch.Tensor], positions="all",
                 cfg: ProbeConfig | None = None, groups: list | None = None) -> ProbeResult:
    """Per-layer probe accuracy of several targets (e.g. ``{"state": ..., "parity": ...}``).

    ``labels[name]`` is [N, T] in padded coordinates (positions="all"; -1 ignores a position, padding is
    ignored automatically) or [N] / [N, T] for positions="last" (the last column is used).
    """
    cfg = cfg or ProbeConfig()
    inputs = model_inputs(prompts)
    N = inputs["input_ids"].shape[0]
    t0 = time.perf_counter()
    acts = collect_residuals(lm, inputs, positions, chunk_rows=cfg.chunk_rows)
    t_acts = time.perf_counter() - t0
    if positions == "all":
        pad = inputs["attention_mask"] == 0
        labels = {k: torch.as_tensor(v, dtype=torch.long).masked_fill(pad, IGNORE) for k, v in labels.items()}
    elif positions == "last":
        labels = {k: _final_labels(v, N) for k, v in labels.items()}
    res = probe_activations(acts, labels, cfg, groups)
    res.timings["activations_s"] = t_acts
    return res


@dataclass
class LengthwiseResult:
    """Final-position probe accuracy per (target, layer, length)."""

    targets: list[str]
    layers: list[int]
    lengths: list[int]
    test_acc: torch.Tensor            # [targets, layers, lengths]
    train_acc: torch.Tensor           # [targets, layers, lengths]
    chance: torch.Tensor              # [targets, lengths]
    config: ProbeConfig | None = None
    timings: dict = field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"target": t, "layer": l, "length": n, "test_acc": float(self.test_acc[i, j, k]),
                              "train_acc": float(self.train_acc[i, j, k]), "chance": float(self.chance[i, k])}
                             for i, t in enumerate(self.targets) for j, l in enumerate(self.layers)
                             for k, n in enumerate(self.lengths)])

    def first_decodable_layer(self, target: str, threshold: float = 0.9) -> list[int | None]:
        """Per length, the first layer whose test accuracy reaches ``threshold`` (None if none does)."""
        acc = self.test_acc[self.targets.index(target)]
        out = []
        for k in range(len(self.lengths)):
            hit = (acc[:, k] >= threshold).nonzero()
            out.append(self.layers[int(hit[0])] if len(hit) else None)
        return out

    def plot(self, path=None):
        """One heatmap (layer x length) of final-position test accuracy per target."""
        plt = pyplot()
        n = len(self.targets)
        fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
        for i, t in enumerate(self.targets):
            ax = axes[0, i]
            im = ax.imshow(self.test_acc[i].numpy(), origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(self.lengths)), [str(x) for x in self.lengths])
            ax.set_yticks(range(len(self.layers)), [str(x) for x in self.layers])
            ax.set_xlabel("sequence length")
            ax.set_ylabel("layer (0 = embeddings)")
            ax.set_title(f"{t}: final-position probe accuracy")
            fig.colorbar(im, ax=ax)
        return finish(fig, path)


def lengthwise_probe(lm, make_prompts: Callable, lengths, n_prompts: int = 200,
                     cfg: ProbeConfig | None = None) -> LengthwiseResult:
    """For each length L, probe the final position of ``n_prompts`` prompts of length L at every layer.

    ``make_prompts(length, n, seed)`` returns ``(prompts, labels)``: prompts as accepted by
    ``collect_residuals`` (PromptSet, input dict or id tensor) and ``labels`` a dict of [N] (or [N, T]:
    the last column is used) final-position labels. Probing knows nothing about the task.
    """
    cfg = cfg or ProbeConfig()
    lengths = list(lengths)
    accs, trains, chances, names = [], [], [], None
    t0 = time.perf_counter()
    for k, length in enumerate(lengths):
        prompts, labels = make_prompts(length, n_prompts, cfg.seed + k)
        names = names or list(labels)
        res = probe_layers(lm, prompts, labels, positions="last", cfg=cfg)
        accs.append(res.test_acc)
        trains.append(res.train_acc)
        chances.append(res.chance)
    L = lm.arch.n_layers + 1
    return LengthwiseResult(targets=names, layers=list(range(L)), lengths=lengths,
                            test_acc=torch.stack(accs, -1), train_acc=torch.stack(trains, -1),
                            chance=torch.stack(chances, -1), config=cfg,
                            timings={"total_s": time.perf_counter() - t0})


# ----------------------------------------------------------------------------------------------------
# random-weight baseline
# ----------------------------------------------------------------------------------------------------
def random_like(lm, seed: int = 0):
    """The same architecture and tokenizer with freshly initialised (random) weights, as a LoadedModel."""
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM

    from interpkit.arch import Arch
    from interpkit.models import LoadedModel

    if lm.remote:
        raise UserError("the random-weight baseline builds a local model; run it without --remote")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(lm.hf.config, attn_implementation="eager").eval()
    family = lm.arch.family
    model = TransformersModel(hf, tokenizer=lm.tokenizer, rename=family.rename)
    return LoadedModel(name=f"{lm.name} (random init)", model=model, arch=Arch.from_hf(hf, family),
                       tokenizer=lm.tokenizer)

def labels_from_meta(prompts, targets: list[str], positions) -> dict[str, torch.Tensor]:
    """Integer labels from a PromptSet's ``meta``.

    A scalar per row labels the probed position (positions "last" or a role); a list per row labels
    the row's last ``len(list)`` positions (right-aligned in the left-padded batch), for "all".
    Non-integer values (strings, tuples) are mapped to class indices in sorted order.
    """
    N, T = prompts.input_ids.shape
    out = {}
    for name in targets:
        vals = prompts.meta_field(name)
        per_pos = isinstance(vals[0], (list, tuple)) and not isinstance(vals[0], str)
        flat = [v for row in vals for v in row] if per_pos else list(vals)
        index = {v: i for i, v in enumerate(sorted(set(flat), key=repr))}
        code = (lambda v: int(v)) if all(isinstance(v, int) for v in flat) else (lambda v: index[v])
        if per_pos:
            if positions != "all":
                raise UserError(f"meta {name!r} is per-position; probe it with --positions all")
            lab = torch.full((N, T), IGNORE)
            for i, row in enumerate(vals):
                lab[i, T - len(row):] = torch.tensor([code(v) for v in row])
        else:
            if positions == "all":
                raise UserError(f"meta {name!r} has one value per prompt; probe it at 'last' or a role")
            lab = torch.tensor([code(v) for v in vals])
        out[name] = lab
    return out
