"""Circular features (Engels et al., "Not All Language Model Features Are Linear"): find and use them.

Days-of-week and months-of-year arithmetic ("Two days from Monday is" -> Wednesday) with a value a in
Z_p (p = 7 or 12) at a role token (``start`` by default):

1. **Circle probe.** At every layer, PCA (k components, 5 by default) of the residual at the role token
   over all problems, then least squares from the k PCA coordinates (+ intercept) to
   (cos 2 pi a / p, sin 2 pi a / p). R^2 per layer, in-sample (as in the paper) and held out by value
   (fit on p - 1 values, predict the left-out one: only a real circle generalises to an unseen value;
   with few distinct points in-sample R^2 can be high by chance). W = Q R (QR) gives the 2-D circle
   plane span(V Q) in the residual stream.
2. **Interventions** at the role token of problem (a, b), towards every other value a' (new answer
   c' = answer of problem (a', b)), at the residual entering block l (l = 0: embedding output):
   - ``circle``: residual <- mean + V Q q(a'), with q(a') = (t(a') - intercept) R^-1: the average
     activation, except in the circle plane where it encodes a';
   - ``layer``: residual <- the residual of problem (a', b) at its role token;
   - ``pca``: the top-k PCA coordinates replaced by those of problem (a', b);
   - ``mean``: residual <- mean (mean ablation).
   Metric: logit(c) - logit(c') at the last position (negative = the answer moved to c'), and the rate
   at which the argmax over the p answer tokens becomes c'. ``none`` is the unpatched baseline.
   ``role="result"`` probes and intervenes on the result c at the final token (the paper's c token;
   c -> c' with b fixed; the partner problem is (c' - b, b)); layer ``n_layers`` is the final residual
   (the final norm's input), where a small model's c circle lives. ``role="end"`` probes c there only.
3. **Probe variants** (the paper's ``--probe_on_cos/--probe_on_sin``): ``probe_on`` picks the targets among
   cos, sin and "linear" (a - (p - 1) / 2); the patch then sets every probed coordinate.

4. **Inside the circle** (``circle_sweep``, Engels et al.'s Figure 6): the role token's residual set to points
   r (cos t, sin t) of the probe's plane between two values' angles; results and figures in
   ``analyses.circles.studies``.

All problems, all layers and all methods are rows of a few batched forwards, planned as the sweep
engine's writes (``interpkit.engine``: ``circle_writes``, ``circle_forwards``) and run by it (locally
forward by forward, remotely one request). The replacement data is tiny (per layer: mean, PCA basis,
the p circle points), the source rows are the clean problems in the same batch.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from interpkit.analyses.circles.studies import SweepResult
from interpkit.analyses.probing.linear import collect_residuals
from interpkit.engine.inside import FINAL_IN, LOGITS, Forward, Readout, Write
from interpkit.engine.run import run_forwards
from interpkit.errors import UserError
from interpkit.plots import finish, pyplot
from interpkit.progress import stage

METHODS = ("circle", "layer", "pca", "mean")          # --methods
TARGETS = ("cos", "sin", "linear")                   # --probe-on
PERIODS = {"days": 7, "months": 12}
ROLE_VALUE = {"start": "a", "duration": "b", "end": "c", "result": "c"}   # tasks/calendar.py meta: a + b = c (mod p)
ROLE_OTHER = {"start": "b", "duration": "a", "result": "b"}     # the operand an intervention keeps fixed
ROLE_TOKEN = {"result": "end"}                                  # "result": the value c at the final token


@dataclass
class CircleConfig:
    """Options of the circle probe and interventions; every field is a CLI option."""

    role: str = "start"
    value: str | None = None          # meta field holding the value; default from the role
    period: int | None = None         # default: 7 (days), 12 (months), else number of distinct values
    k: int = 5                        # PCA components
    layers: list[int] | None = None   # intervention layers (residual entering block l); default all
    probe_on: tuple[str, ...] = ("cos", "sin")   # probe targets (the paper's --probe_on_cos/--probe_on_sin;
                                                 # "linear": the centred value a - (p - 1) / 2)
    methods: tuple[str, ...] = METHODS
    targets_per_problem: int | None = None   # subsample a' per problem (big models); None = all p - 1
    seed: int = 0
    max_rows: int = 1024              # rows per intervention forward
    chunk_rows: int = 64              # rows per activation-collection forward
    intervene: bool = True

    def validate(self, n_layers: int) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise UserError(f"unknown intervention method(s) {bad}; use {', '.join(METHODS)}")
        if self.k < 2:
            raise UserError(f"k={self.k}: the circle probe needs at least 2 PCA components")
        bad = [t for t in self.probe_on if t not in TARGETS]
        if bad or not self.probe_on or len(set(self.probe_on)) != len(self.probe_on):
            raise UserError(f"--probe-on {','.join(self.probe_on)!r}: use distinct targets among {', '.join(TARGETS)}")
        if len(self.probe_on) > self.k:
            raise UserError(f"--probe-on has {len(self.probe_on)} targets but k={self.k} PCA components")
        for layer in self.layers or []:
            if not 0 <= layer <= n_layers:
                raise UserError(f"layer {layer} is out of range; interventions use layers 0..{n_layers} "
                                f"({n_layers}: the final residual, before the final norm)")


# ----------------------------------------------------------------------------------------------------
# circle probe (pure tensors)
# ----------------------------------------------------------------------------------------------------
def circle_targets(values: torch.Tensor, period: int, probe_on=("cos", "sin")) -> torch.Tensor:
    """Probe targets [N, len(probe_on)]: cos / sin of 2 pi a / p, and "linear" = a - (p - 1) / 2."""
    ang = 2 * math.pi * values.double() / period
    cols = {"cos": ang.cos(), "sin": ang.sin(), "linear": values.double() - (period - 1) / 2}
    return torch.stack([cols[t] for t in probe_on], -1)


def pca(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [d], components V [d, k] with a deterministic sign, explained-variance ratio [k])."""
    X = X.double()
    mu = X.mean(0)
    U, S, Vh = torch.linalg.svd(X - mu, full_matrices=False)
    V = Vh[:k].T
    k_eff = V.shape[1]
    if k_eff < k:                                                   # fewer points than components
        V = torch.cat([V, torch.zeros(V.shape[0], k - k_eff, dtype=V.dtype)], 1)
    sign = torch.sign(V.gather(0, V.abs().argmax(0, keepdim=True))).clamp_min(0) * 2 - 1
    V = V * torch.where(sign == 0, torch.ones_like(sign), sign)
    var = S.pow(2)
    ratio = torch.zeros(k, dtype=X.dtype)
    ratio[:k_eff] = var[:k_eff] / var.sum().clamp_min(1e-30)
    return mu, V, ratio


def _lstsq(Z: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Y ~ Z W + b by least squares (minimum norm): (W [k, 2], b [2])."""
    A = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1)
    sol = torch.linalg.pinv(A) @ Y
    return sol[:-1], sol[-1]


def _r2(Y: torch.Tensor, pred: torch.Tensor) -> tuple[float, torch.Tensor]:
    ss_res = (Y - pred).pow(2).sum(0)
    ss_tot = (Y - Y.mean(0)).pow(2).sum(0).clamp_min(1e-30)
    return float(1 - ss_res.sum() / ss_tot.sum()), 1 - ss_res / ss_tot


@dataclass
class CircleFit:
    """The circle probe at every layer (index l = residual entering block l; last = final output)."""

    period: int
    k: int
    mean: torch.Tensor        # [L, d]
    V: torch.Tensor           # [L, d, k] PCA components
    explained: torch.Tensor   # [L, k]
    W: torch.Tensor           # [L, k, 2] PCA coordinates -> (cos, sin)
    b: torch.Tensor           # [L, 2]
    Q: torch.Tensor           # [L, k, 2] orthonormal: the circle plane in PCA coordinates
    R: torch.Tensor           # [L, 2, 2]
    r2: torch.Tensor          # [L] in-sample R^2 (both targets pooled)
    r2_cos: torch.Tensor      # [L]
    r2_sin: torch.Tensor      # [L]
    r2_heldout: torch.Tensor  # [L] leave-one-value-out R^2
    probe_on: tuple = ("cos", "sin")
    r2_targets: torch.Tensor | None = None   # [L, len(probe_on)] in-sample R^2 per target

    def plane(self, layer: int) -> torch.Tensor:
        """[d, 2] orthonormal basis of the circle plane in the residual stream."""
        return self.V[layer] @ self.Q[layer]

    def coords(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """Circle-plane coordinates [N, 2] (q = (x - mean) V Q) of activations X [N, d]."""
        return (X.double() - self.mean[layer]) @ self.plane(layer)

    def predict(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """Predicted (cos, sin) [N, 2]."""
        return (X.double() - self.mean[layer]) @ self.V[layer] @ self.W[layer] + self.b[layer]

    def circle_points(self, layer: int) -> torch.Tensor:
        """[p, d]: mean + V Q q(a) for every value a, q(a) = (t(a) - b) R^-1 (the ``circle`` patch)."""
        return self.points_for(circle_targets(torch.arange(self.period), self.period, self.probe_on), layer)

    def points_for(self, targets: torch.Tensor, layer: int) -> torch.Tensor:
        """[n, d]: the activation whose probe reads ``targets`` [n, len(probe_on)] (mean elsewhere)."""
        q = (targets.double() - self.b[layer]) @ torch.linalg.pinv(self.R[layer])
        return self.mean[layer] + q @ self.plane(layer).T


def fit_circle(acts: torch.Tensor, values: torch.Tensor, period: int, k: int = 5,
               probe_on=("cos", "sin")) -> CircleFit:
    """Fit the circle probe at every layer of acts [N, L, d] for values [N] in 0..period-1."""
    acts, values = acts.double(), torch.as_tensor(values).long() % period
    probe_on = tuple(probe_on)
    N, L, d = acts.shape
    Y = circle_targets(values, period, probe_on)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    out = {n: [] for n in ("mean", "V", "explained", "W", "b", "Q", "R", "r2", "r2_cos", "r2_sin", "r2_heldout",
                           "r2_targets")}
    for layer in range(L):
        X = acts[:, layer]
        mu, V, ratio = pca(X, k)
        Z = (X - mu) @ V
        W, b = _lstsq(Z, Y)
        Q, R = torch.linalg.qr(W)
        r2, per = _r2(Y, Z @ W + b)
        pick = lambda t: per[probe_on.index(t)] if t in probe_on else nan  # noqa: E731
        for name, v in (("mean", mu), ("V", V), ("explained", ratio), ("W", W), ("b", b), ("Q", Q), ("R", R),
                        ("r2", torch.tensor(r2)), ("r2_cos", pick("cos")), ("r2_sin", pick("sin")),
                        ("r2_heldout", torch.tensor(heldout_r2(X, values, period, k, probe_on))),
                        ("r2_targets", per)):
            out[name].append(v)
    return CircleFit(period=period, k=k, probe_on=probe_on, **{n: torch.stack(v) for n, v in out.items()})


def heldout_r2(X: torch.Tensor, values: torch.Tensor, period: int, k: int, probe_on=("cos", "sin")) -> float:
    """R^2 of the targets predicted for each value by a PCA + least-squares probe fitted without it."""
    Y = circle_targets(values, period, probe_on)
    pred = torch.zeros_like(Y)
    present = torch.unique(values)
    if len(present) < 3:
        return float("nan")
    for v in present:
        test = values == v
        mu, V, _ = pca(X[~test], k)
        W, b = _lstsq((X[~test] - mu) @ V, Y[~test])
        pred[test] = (X[test] - mu) @ V @ W + b
    return _r2(Y, pred)[0]


# ----------------------------------------------------------------------------------------------------
# interventions
# ----------------------------------------------------------------------------------------------------
def partner_rows(values: torch.Tensor, others: torch.Tensor) -> dict[tuple[int, int], int]:
    """(value, other operand) -> row, to find the problem (a', b) of a problem (a, b)."""
    return {(int(v), int(o)): i for i, (v, o) in enumerate(zip(values.tolist(), others.tolist()))}


def plan_items(values, others, period: int, layers: list[int], methods, per_problem: int | None, seed: int):
    """All (layer, method, row i, target value a', partner row j) runs, sorted by layer."""
    lookup = partner_rows(values, others)
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (a, b) in enumerate(zip(values.tolist(), others.tolist())):
        targets = [t for t in range(period) if t != a % period and (t, b) in lookup]
        if per_problem is not None and len(targets) > per_problem:
            targets = [targets[j] for j in torch.randperm(len(targets), generator=g)[:per_problem].tolist()]
        pairs += [(i, t, lookup[(t, b)]) for t in targets]
    if not pairs:
        raise UserError("no problem has a partner with another value and the same other operand; "
                        "interventions need the full grid of problems (use the task's default n)")
    items = [(layer, m, i, t, j) for layer in layers for m in methods for (i, t, j) in pairs]
    return items, pairs


def _forward_parts(items: list, N: int, max_rows: int) -> list[list]:
    """``items`` cut into the patched rows of forwards of at most ``max_rows`` rows (the N clean rows first)."""
    per = max(1, max_rows - N)
    return [items[s:s + per] for s in range(0, len(items), per)]


def circle_writes(part: list, N: int, pos: torch.Tensor, fit: CircleFit, n_layers: int | None = None) -> list[Write]:
    """The engine writes of one forward's patched rows (row N + k is ``part[k]``), in forward order: per
    layer (the residual entering it; ``n_layers``: the final norm's input), one ``Write`` per method at
    the role positions: ``circle`` the probe's point of a' (rows of the p points), ``layer`` the partner
    row's residual at its role position, ``pca`` only its component in the top-k PCA subspace, ``mean``
    the mean. Sources are clean rows of the same batch, never written."""
    writes = []
    for layer in sorted({it[0] for it in part}):
        name = FINAL_IN if layer == n_layers else "resid_pre"
        for m in METHODS:
            ks = [k for k, it in enumerate(part) if it[0] == layer and it[1] == m]
            if not ks:
                continue
            rows = torch.tensor(ks) + N
            i = torch.tensor([part[k][2] for k in ks])
            j = torch.tensor([part[k][4] for k in ks])
            t = torch.tensor([part[k][3] for k in ks])
            if m == "circle":
                writes.append(Write(name, layer, rows, pos=pos[i], value=fit.circle_points(layer).float(), take=t))
            elif m == "layer":
                writes.append(Write(name, layer, rows, pos=pos[i], src=j, src_pos=pos[j]))
            elif m == "pca":
                writes.append(Write(name, layer, rows, pos=pos[i], src=j, src_pos=pos[j], basis=fit.V[layer].float()))
            else:
                writes.append(Write(name, layer, rows, pos=pos[i], value=fit.mean[layer].float()))
    return writes


def circle_forwards(parts: list, clean: dict, writes, candidates: torch.Tensor) -> list[Forward]:
    """One engine ``Forward`` per part: the clean rows, then the part's source rows (``parts[k][1]``)
    patched by ``writes(part)``; each reports the last position's candidate logits."""
    out = []
    for part, src_rows in parts:
        inputs = {k: torch.cat([v, v[src_rows]]) for k, v in clean.items()}
        out.append(Forward(inputs, Readout(LOGITS, candidates, candidates=candidates), writes(part)))
    return out


def _run_forwards(lm, forwards: list[Forward]) -> list[torch.Tensor]:
    """Candidate logits of every forward: locally one by one (progress), remotely one request."""
    with stage("circle interventions", len(forwards), "forwards", enabled=not lm.remote) as bar:
        outs = run_forwards(lm.model, forwards, lm.remote, bar)
    return [torch.as_tensor(o[0]) for o in outs]


@dataclass
class CircleResult:
    """Circle probe per layer and intervention effects per (method, layer)."""

    task: str
    role: str
    config: CircleConfig
    fit: CircleFit
    values: torch.Tensor              # [N] value at the role
    coords: torch.Tensor              # [L+1, N, 2] circle-plane coordinates
    pcs: torch.Tensor                 # [L+1, N, 2] top-2 PCA coordinates
    layers: list[int] = field(default_factory=list)        # intervention layers
    methods: list[str] = field(default_factory=list)
    logit_diff: torch.Tensor | None = None   # [methods, layers] mean logit(c) - logit(c')
    flip_rate: torch.Tensor | None = None    # [methods, layers] argmax over answers becomes c'
    run_logit_diff: torch.Tensor | None = None   # [methods, layers, runs] per (problem, a') run
    runs: torch.Tensor | None = None         # [runs, 3]: problem row i, target value a', partner row j
    noop_logit_diff: float = float("nan")
    noop_flip_rate: float = float("nan")
    accuracy: float = float("nan")           # clean argmax over the answer tokens == c
    n_runs: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def r2(self) -> torch.Tensor:
        return self.fit.r2

    def probe_dataframe(self):
        import pandas as pd

        f = self.fit
        return pd.DataFrame([{"layer": l, "r2": float(f.r2[l]), "r2_heldout": float(f.r2_heldout[l]),
                              "r2_cos": float(f.r2_cos[l]), "r2_sin": float(f.r2_sin[l]),
                              "explained_k": float(f.explained[l].sum())} for l in range(len(f.r2))])

    def to_dataframe(self):
        """Intervention effects: one row per (method, layer), plus the no-op baseline per layer."""
        import pandas as pd

        rows = [{"method": m, "layer": l, "logit_diff": float(self.logit_diff[a, b]),
                 "flip_rate": float(self.flip_rate[a, b])}
                for a, m in enumerate(self.methods) for b, l in enumerate(self.layers)]
        rows += [{"method": "none", "layer": l, "logit_diff": self.noop_logit_diff, "flip_rate": self.noop_flip_rate}
                 for l in self.layers]
        return pd.DataFrame(rows)

    # -- plots ------------------------------------------------------------------------------------
    def plot_r2(self, path=None, label: str = "model", other: "CircleResult | None" = None,
                other_label: str = "random init"):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for res, lab, c in ((self, label, "C0"), (other, other_label, "C3")):
            if res is None:
                continue
            L = range(len(res.fit.r2))
            ax.plot(L, res.fit.r2.numpy(), marker="o", color=c, label=f"{lab}: R² (in-sample)")
            ax.plot(L, res.fit.r2_heldout.numpy(), marker="s", ls="--", color=c, label=f"{lab}: R² (held-out value)")
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(self.fit.r2)))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("circle probe R²")
        lows = [float(r.fit.r2_heldout.nan_to_num(0).min()) for r in (self, other) if r is not None]
        ax.set_ylim(min([-0.1] + lows) - 0.05, 1.02)
        ax.set_title(f"{self.task}: circle probe at '{self.role}' (k={self.fit.k})")
        ax.legend(fontsize=7)
        return finish(fig, path)

    def plot_scatter(self, path=None, layers: list[int] | None = None):
        """Top-2 PCA coordinates at the role token, coloured by value, one panel per layer."""
        plt = pyplot()
        layers = layers if layers is not None else list(range(len(self.fit.r2)))
        n = len(layers)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            sc = ax.scatter(self.pcs[layer, :, 0], self.pcs[layer, :, 1], c=self.values % self.fit.period,
                            cmap="hsv", vmin=0, vmax=self.fit.period, s=14)
            ax.set_title(f"layer {layer}  R²={float(self.fit.r2[layer]):.2f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(sc, ax=axes[0, -1], label="value")
        return finish(fig, path)

    def plot_interventions(self, path=None):
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        style = {"circle": ("o", "-"), "layer": ("s", "--"), "pca": ("^", ":"), "mean": ("x", "-.")}
        for a, m in enumerate(self.methods):
            mk, ls = style.get(m, ("o", "-"))              # distinct styles: layer and pca often coincide
            axes[0].plot(self.layers, self.logit_diff[a].numpy(), marker=mk, ls=ls, label=f"patch {m}")
            axes[1].plot(self.layers, self.flip_rate[a].numpy(), marker=mk, ls=ls, label=f"patch {m}")
        axes[0].axhline(self.noop_logit_diff, color="k", ls="--", lw=1, label="no intervention")
        axes[1].axhline(self.noop_flip_rate, color="k", ls="--", lw=1, label="no intervention")
        axes[0].set_ylabel("logit(original) - logit(new answer)")
        axes[1].set_ylabel("argmax becomes the new answer")
        axes[1].set_ylim(-0.02, 1.02)
        for ax in axes:
            ax.set_xlabel("layer (residual entering block)")
            ax.set_xticks(self.layers)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.task}: interventions at '{self.role}'")
        return finish(fig, path)


def meta_tensor(prompts, key: str) -> torch.Tensor:
    """Meta field ``key`` as a [N] long tensor (values in Z_p), or a one-line error."""
    vals = prompts.meta_field(key)
    if not all(isinstance(v, int) for v in vals):
        raise UserError(f"meta field {key!r} must hold integers (values in Z_p), got {type(vals[0]).__name__}")
    return torch.tensor(vals, dtype=torch.long)


def answer_candidates(prompts, answers: torch.Tensor, period: int) -> torch.Tensor:
    """Token id of each answer value 0..p-1 (from the prompts' own answer tokens)."""
    cand = torch.full((period,), -1, dtype=torch.long)
    for v, tok in zip(answers.tolist(), prompts.answer_ids[:, 0].tolist()):
        cand[v % period] = tok
    if (cand < 0).any():
        missing = (cand < 0).nonzero().flatten().tolist()
        raise UserError(f"answer value(s) {missing} never occur in the prompts; use the task's full grid")
    return cand


def run_circles(lm, prompts, cfg: CircleConfig | None = None) -> CircleResult:
    """Circle probe at ``cfg.role`` and (optionally) the four interventions, on a calendar PromptSet.

    The PromptSet needs the role ``cfg.role`` and integer meta fields a (start), b (duration) and
    c (answer = a + b mod p), as ``tasks.calendar`` builds them.
    """
    cfg = cfg or CircleConfig()
    n_layers = lm.arch.n_layers
    cfg.validate(n_layers)
    token = ROLE_TOKEN.get(cfg.role, cfg.role)
    pos = prompts.role(token)
    value_key = cfg.value or ROLE_VALUE.get(cfg.role, cfg.role)
    values = meta_tensor(prompts, value_key)
    period = cfg.period or PERIODS.get(prompts.task) or len(torch.unique(values))
    values = values % period
    t0 = time.perf_counter()
    print(f"circle probe: {len(prompts)} prompts, {n_layers + 1} residual layers at {token!r}", file=sys.stderr)
    acts = collect_residuals(lm, prompts, pos, chunk_rows=cfg.chunk_rows)            # [N, L+1, d]
    timings = {"activations_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    fit = fit_circle(acts, values, period, cfg.k, cfg.probe_on)
    coords = torch.stack([fit.coords(acts[:, l], l) for l in range(n_layers + 1)]).float()
    pcs = torch.stack([((acts[:, l].double() - fit.mean[l]) @ fit.V[l][:, :2]) for l in range(n_layers + 1)]).float()
    timings["probe_s"] = time.perf_counter() - t0
    res = CircleResult(task=prompts.task, role=cfg.role, config=cfg, fit=fit, values=values, coords=coords,
                       pcs=pcs, timings=timings)
    if cfg.intervene:
        if cfg.role not in ROLE_OTHER:
            raise UserError(f"interventions need --role {', '.join(ROLE_OTHER)} (the operands a, b, or the result c "
                            f"at the final token: role result), or --no-intervene to only probe")
        _intervene(lm, prompts, cfg, fit, values, period, pos, res)
    return res


def _intervene(lm, prompts, cfg: CircleConfig, fit: CircleFit, values, period, pos, res: CircleResult) -> None:
    others = meta_tensor(prompts, ROLE_OTHER[cfg.role])   # role result: c -> c' with b fixed; new answer c'
    answers = meta_tensor(prompts, "c") % period
    cand = answer_candidates(prompts, answers, period)
    layers = cfg.layers if cfg.layers is not None else list(range(lm.arch.n_layers))
    methods = list(cfg.methods)
    items, pairs = plan_items(values, others, period, layers, methods, cfg.targets_per_problem, cfg.seed)
    # items are ordered (layer, method, pair): reshaping the outputs to [layers, methods, pairs] relies on it
    N = len(prompts)
    parts = [(part, torch.tensor([it[2] for it in part])) for part in _forward_parts(items, N, cfg.max_rows)]
    forwards = circle_forwards(parts, prompts.batch(), lambda part: circle_writes(part, N, pos, fit, lm.arch.n_layers),
                               cand)
    t0 = time.perf_counter()
    outs = _run_forwards(lm, forwards)
    res.timings["interventions_s"] = time.perf_counter() - t0
    res.timings["forwards"] = len(forwards)

    logits_clean = outs[0][:N]
    res.accuracy = float((logits_clean.argmax(-1) == answers).float().mean())
    i = torch.tensor([p[0] for p in pairs])
    new = answers[torch.tensor([p[2] for p in pairs])]
    orig = answers[i]
    res.noop_logit_diff = float((logits_clean[i, orig] - logits_clean[i, new]).mean())
    res.noop_flip_rate = float((logits_clean[i].argmax(-1) == new).float().mean())

    patched = torch.cat([out[N:] for out in outs])                 # items in order
    item_i = torch.tensor([it[2] for it in items])
    item_new = answers[torch.tensor([it[4] for it in items])]
    item_orig = answers[item_i]
    ld = patched.gather(1, item_orig[:, None])[:, 0] - patched.gather(1, item_new[:, None])[:, 0]
    flip = (patched.argmax(-1) == item_new).float()
    P = len(pairs)
    res.layers, res.methods = layers, methods
    res.run_logit_diff = ld.reshape(len(layers), len(methods), P).transpose(0, 1).contiguous()
    res.runs = torch.tensor(pairs)
    res.logit_diff = res.run_logit_diff.mean(-1)
    res.flip_rate = flip.reshape(len(layers), len(methods), P).mean(-1).T.contiguous()
    res.n_runs = len(items)


def circle_sweep(lm, prompts, fit, layer: int, frm: int, to: int, radii=None, n_angles: int = 13,
                 role: str = "start", max_rows: int = 1024, progress=None) -> SweepResult:
    """Set the role token's residual entering ``layer`` to the point r (cos t, sin t) of the circle probe
    ``fit`` (probe_on must be cos, sin) for every radius and angle from value ``frm`` to value ``to``, in
    every problem (Engels et al.'s Figure 6; ``analyses.circles.studies``)."""
    if tuple(fit.probe_on) != ("cos", "sin"):
        raise UserError("the circle sweep needs the probe on cos,sin (--probe-on cos,sin)")
    if role not in ("start", "duration"):
        raise UserError("the circle sweep moves an operand: role start or duration")
    p = fit.period
    if not (0 <= frm < p and 0 <= to < p) or frm == to:
        raise UserError(f"--sweep-between {frm},{to}: two different values in 0..{p - 1}")
    if not 0 <= layer < lm.arch.n_layers:
        raise UserError(f"layer {layer} is out of range; the sweep uses layers 0..{lm.arch.n_layers - 1}")
    radii = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.9] if radii is None else radii, dtype=np.float64)
    a0, a1 = 2 * math.pi * frm / p, 2 * math.pi * to / p
    if a1 <= a0:
        a1 += 2 * math.pi                                          # forward from ``frm`` to ``to``
    angles = np.linspace(a0, a1, n_angles)
    other = meta_tensor(prompts, ROLE_OTHER[role])
    answers = meta_tensor(prompts, "c") % p
    cand = answer_candidates(prompts, answers, p)
    N = len(prompts)
    rr, aa = np.meshgrid(radii, angles, indexing="ij")
    targets = torch.tensor(np.stack([rr * np.cos(aa), rr * np.sin(aa)], -1).reshape(-1, 2))
    points = fit.points_for(targets, layer).float()                # [R*A, d]
    pos = prompts.roles[role]
    items = [(g, i) for g in range(len(targets)) for i in range(N)]
    parts = [(part, torch.tensor([it[1] for it in part])) for part in _forward_parts(items, N, max_rows)]

    def writes(part):                                              # row N + k: problem i at point g
        i, g = torch.tensor([it[1] for it in part]), torch.tensor([it[0] for it in part])
        return [Write("resid_pre", layer, torch.arange(len(part)) + N, pos=pos[i], value=points, take=g)]

    outs = _run_forwards(lm, circle_forwards(parts, prompts.batch(), writes, cand))
    if progress is not None:
        progress(len(parts))
    logits = torch.cat([o[N:] for o in outs]).reshape(len(targets), N, p)
    pred = logits.argmax(-1)                                       # answer value
    implied = (pred - other[None]) % p if role == "start" else (pred - meta_tensor(prompts, "a")[None]) % p
    c_from, c_to = (frm + other) % p, (to + other) % p
    if role == "duration":
        a = meta_tensor(prompts, "a")
        c_from, c_to = (a + frm) % p, (a + to) % p
    ld = logits.gather(2, c_from.expand(len(targets), N)[..., None])[..., 0] - \
        logits.gather(2, c_to.expand(len(targets), N)[..., None])[..., 0]
    R, A = len(radii), n_angles
    imp = implied.reshape(R, A, N).numpy()
    return SweepResult(layer=layer, frm=frm, to=to, radii=radii, angles=angles,
                       share_from=(imp == frm).mean(-1), share_to=(imp == to).mean(-1),
                       share_other=((imp != frm) & (imp != to)).mean(-1),
                       logit_diff=ld.reshape(R, A, N).mean(-1).numpy(), implied=imp, n_problems=N)

