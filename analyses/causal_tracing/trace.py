"""ROME causal tracing (Meng et al. 2022), batched.

For each fact the subject's token embeddings are corrupted with Gaussian (or uniform) noise, ``samples``
times with noise drawn once per fact from a seeded generator, and the probability of the answer token
(the clean greedy prediction, as in ROME) is read at the last position:

* high score = clean probability, low score = mean probability over the corrupted samples;
* a restoration copies clean activations into every corrupted sample and reports the mean probability:
  ``hidden`` restores one layer output h_t^(l); ``mlp`` / ``attn`` restore the MLP / attention outputs
  of token t in a window of ``window`` layers around l ([l - w//2, l - w//2 + w), clipped);
  ``severed_mlp`` / ``severed_attn`` restore h_t^(l) while holding token t's MLP / attention outputs in
  all layers at the corrupted sample's values (ROME's severed runs, done in the same forward);
* indirect effect IE = restored - low; total effect TE = high - low; AIE / ATE average over facts, over
  six token groups (first / middle / last subject token, first subsequent, further tokens, last token).

Both engines are planners on the sweep engine (``interpkit.engine``) and compute the same numbers (to
float rounding; both tested against a plain-hook reference):

* ``prefix`` (default, ``analyses.causal_tracing.prefix``): one reference forward per fact, then only
  the tokens and layers each restoration can change, on the reference's key/value cache (engine sweeps);
* ``batched`` (here): every restoration as batch rows of full forwards (engine ``Forward`` records). Row
  0 clean, rows 1..S corrupted, then S rows per restoration; at each layer and site every row that
  restores there takes its source row's value with one indexed ``Write`` (source rows of the same
  batch), so severed runs read the corrupted values live. Exact identities (restore-all = clean, zero
  noise = zero IE) hold bit for bit here.

Noise is made outside the trace and shipped as a small [S + 1, T, d] bank (an engine ``Noise``); it is
added to ``model.embed``'s output inside the trace. The engine runs everything locally or remotely (one
chunk of facts is one request: a session of the chunk's forwards).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from interpkit.analyses.causal_tracing.facts import (GROUPS, Fact, answer_fact, facts_of, position_groups,
                                   subject_batches, token_groups)
from interpkit.analyses.causal_tracing.noise import MODEL_RULES, build_noise_model
from interpkit.analyses.causal_tracing.prefix import (SITE_NAMES, FactJob, FactScores, noise_bank, restoration_writes,
                                            trace_facts_prefix)
from interpkit.engine.inside import ANSWER_PROB, Forward, Noise, Readout, Write
from interpkit.engine.run import run_forwards, run_traces
from interpkit.errors import UserError
from interpkit.progress import stage

BASE_KINDS = ("hidden", "mlp", "attn")
SEVERED_KINDS = ("severed_mlp", "severed_attn")
# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TraceConfig:
    """How to trace; every field is a CLI option or a key of ``--config file.yaml``."""

    noise: str | float = "3sigma"   # "<k>sigma": k x std of subject embeddings over the dataset; or a number
    uniform: bool = False           # uniform noise in [-level, level] instead of level * N(0, 1)
    replace: bool = False           # replace the subject embeddings by the sample (analyses.causal_tracing.noise)
    samples: int = 10               # corrupted samples per fact
    window: int = 10                # layers per mlp / attn restoration window
    kinds: list[str] = field(default_factory=lambda: list(BASE_KINDS))
    severed: bool = False           # also severed_mlp and severed_attn
    seed: int = 1                   # noise seed; each fact's noise depends only on (seed, fact id)
    answer: str = "top1"            # "top1": the clean greedy prediction (ROME); "given": prompts.answer_ids
    max_rows: int = 1024            # rows per forward (memory knob)
    engine: str = "prefix"          # "prefix": skip work a restoration cannot change; "batched": full forwards
    facts_per_chunk: int = 8        # facts per stored chunk (and per remote request)

    def all_kinds(self) -> list[str]:
        return list(self.kinds) + ([k for k in SEVERED_KINDS if k not in self.kinds] if self.severed else [])

    def validate(self) -> None:
        bad = [k for k in self.all_kinds() if k not in BASE_KINDS + SEVERED_KINDS]
        checks = [(not bad, f"kind {bad}; use hidden, mlp, attn (and --severed)"),
                  (len(self.all_kinds()) > 0, "no kinds selected; use --kind hidden|mlp|attn|all"),
                  (self.samples >= 1, "samples must be >= 1"), (self.window >= 1, "window must be >= 1"),
                  (self.answer in ("top1", "given"), f"answer {self.answer!r}; use top1 or given"),
                  (self.max_rows >= 2 * self.samples + 1,
                   f"max_rows must be >= 2 * samples + 1 = {2 * self.samples + 1}"),
                  (self.facts_per_chunk >= 1, "facts_per_chunk must be >= 1"),
                  (self.engine in ("prefix", "batched"), f"engine {self.engine!r}; use prefix or batched")]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"bad causal-trace option: {msg}")
        parse_noise(self.noise)


def parse_noise(noise) -> tuple[str, float]:
    """("sigma", k) for "<k>sigma" / "s<k>", ("fixed", x) for a number; the other rules of
    ``analyses.causal_tracing.noise`` (uniform, mvn, t, subject) as (kind, value)."""
    from interpkit.analyses.causal_tracing.noise import parse_rule

    rule = parse_rule(noise)
    return rule.kind, rule.value


# --------------------------------------------------------------------------------------------------
# facts, token groups and noise
# --------------------------------------------------------------------------------------------------
def fact_noise(cfg: TraceConfig, fact: Fact, d_model: int, level: float) -> torch.Tensor:
    """[samples, n_subject_tokens, d] noise, fixed by (cfg.seed, fact.key) so reruns and chunkings agree."""
    if hasattr(level, "sample"):                   # a causal_noise.NoiseModel (other rules, --replace)
        return level.sample(cfg, fact, d_model)
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + fact.key) % (2 ** 63))
    shape = (cfg.samples, fact.subject_last - fact.subject_first + 1, d_model)
    if cfg.uniform:
        return (torch.rand(shape, generator=g) * 2 - 1) * level
    return torch.randn(shape, generator=g) * level


# --------------------------------------------------------------------------------------------------
# planning: restorations -> rows and per-(layer, site) indexed writes
# --------------------------------------------------------------------------------------------------
def plan_forward(restorations: list, samples: int, window: int, n_layers: int) -> list[Write]:
    """The writes of one batched forward, in forward order: one ``Write`` per (layer, site).

    Restoration r occupies rows 1 + S + r * S + s for sample s; a write's source row is 0 (clean) or 1 + s
    (the row's corrupted sample)."""
    acc: dict[tuple[int, int], list[list[int]]] = {}
    for r, spec in enumerate(restorations):
        writes = restoration_writes(spec, window, n_layers)
        for s in range(samples):
            row = 1 + samples + r * samples + s
            for lay, site_, pos, held in writes:
                rows, poss, srcs = acc.setdefault((lay, site_), [[], [], []])
                rows.append(row), poss.append(pos), srcs.append(1 + s if held else 0)
    return [Write(SITE_NAMES[site_], lay, torch.tensor(v[0]), pos=torch.tensor(v[1]), src=torch.tensor(v[2]))
            for (lay, site_), v in sorted(acc.items())]


def split_restorations(restorations: list, samples: int, max_rows: int) -> list[list]:
    """Restorations per forward, balanced, each forward at most max_rows rows (incl. 1 + S base rows)."""
    per = max(1, (max_rows - 1 - samples) // samples)
    n = max(1, math.ceil(len(restorations) / per))
    size = math.ceil(len(restorations) / n) if restorations else 0
    return [restorations[i:i + size] for i in range(0, len(restorations), size)] if restorations else [[]]


def grid(kinds: list[str], n_tokens: int, n_layers: int) -> list[tuple[str, int, int]]:
    return [(k, t, l) for k in kinds for t in range(n_tokens) for l in range(n_layers)]


def fact_forwards(job: FactJob, cfg: TraceConfig, n_layers: int) -> list[tuple[Forward, list]]:
    """The batched engine's forwards of one fact, each with its restorations: rows 0 clean, 1..S
    corrupted, then S rows per restoration; noise by row from the fact's bank."""
    bank = noise_bank(job.fact, job.noise)
    S, ids = cfg.samples, job.fact.ids
    out = []
    for part in split_restorations(job.restorations, S, cfg.max_rows):
        idx = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, S + 1).repeat(len(part) + 1)])
        B = idx.shape[0]
        inputs = {"input_ids": ids[None].expand(B, -1), "attention_mask": torch.ones(B, ids.shape[0], dtype=torch.long)}
        out.append((Forward(inputs, Readout(ANSWER_PROB, job.answer), plan_forward(part, S, cfg.window, n_layers),
                            Noise(bank, idx)), part))
    return out


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
@dataclass
class FactTrace:
    """One fact's tracing: mean restored answer probability per (kind, token, layer)."""

    index: int                      # row in the PromptSet
    key: int                        # fact id (its noise seed)
    tokens: list[str]
    subject_first: int
    subject_last: int
    answer_id: int
    kinds: list[str]
    scores: torch.Tensor            # [K, T, L]
    low: float                      # corrupted probability (mean over samples)
    high: float                     # clean probability

    @property
    def groups(self) -> dict[str, list[int]]:
        return token_groups(len(self.tokens), self.subject_first, self.subject_last)

    @property
    def ie(self) -> torch.Tensor:
        return self.scores - self.low

    def group_scores(self) -> torch.Tensor:
        """[K, 6, L] mean score over each group's positions (NaN for an empty group)."""
        K, _, L = self.scores.shape
        out = torch.full((K, len(GROUPS), L), float("nan"))
        for g, pos in enumerate(self.groups.values()):
            if pos:
                out[:, g] = self.scores[:, pos].mean(1)
        return out

    def to_dataframe(self):
        import pandas as pd

        labels = position_groups(len(self.tokens), self.subject_first, self.subject_last)
        K, T, L = self.scores.shape
        return pd.DataFrame([{"fact": self.key, "kind": self.kinds[k], "position": t, "token": self.tokens[t],
                              "group": labels[t], "layer": l, "score": float(self.scores[k, t, l]),
                              "ie": float(self.scores[k, t, l] - self.low), "low": self.low, "high": self.high}
                             for k in range(K) for t in range(T) for l in range(L)])


@dataclass
class TraceResult:
    """All facts of a run plus the AIE / ATE aggregation over ROME's six token groups."""

    config: TraceConfig
    noise_level: float
    kinds: list[str]
    facts: list[FactTrace]
    timings: dict = field(default_factory=dict)

    def aggregate(self) -> dict[str, torch.Tensor]:
        """aie [K, 6, L], aie_lo/aie_hi (95% band, 1.96 standard errors), n [K, 6, L] facts per cell,
        ate, ate_se, low, high (means over facts)."""
        if not self.facts:
            raise UserError("no facts were traced; use more --facts or a model that knows them")
        ie = torch.stack([f.group_scores() - f.low for f in self.facts])             # [F, K, 6, L]
        n = (~ie.isnan()).sum(0)
        aie = ie.nanmean(0)
        var = ((ie - aie) ** 2).nansum(0) / (n - 1).clamp_min(1)
        half = 1.96 * var.sqrt() / n.clamp_min(1).sqrt()
        te = torch.tensor([f.high - f.low for f in self.facts])
        ate_se = te.std(unbiased=True) / math.sqrt(len(te)) if len(te) > 1 else torch.tensor(0.0)
        return {"aie": aie, "aie_lo": aie - half, "aie_hi": aie + half, "n": n,
                "ate": te.mean(), "ate_se": ate_se,
                "low": torch.tensor([f.low for f in self.facts]).mean(),
                "high": torch.tensor([f.high for f in self.facts]).mean()}

    def to_dataframe(self):
        """Per kind x group x layer: AIE with its 95% band and the number of facts."""
        import pandas as pd

        agg = self.aggregate()
        L = agg["aie"].shape[-1]
        return pd.DataFrame([{"kind": k, "group": g, "layer": l, "aie": float(agg["aie"][ki, gi, l]),
                              "lo": float(agg["aie_lo"][ki, gi, l]), "hi": float(agg["aie_hi"][ki, gi, l]),
                              "n": int(agg["n"][ki, gi, l])}
                             for ki, k in enumerate(self.kinds) for gi, g in enumerate(GROUPS) for l in range(L)])

    def summary(self) -> dict:
        """Per kind: the peak AIE (group, layer, value) and the peak at the last subject token (ROME's early
        site); ATE, mean low and high scores."""
        agg = self.aggregate()
        out = {"facts": len(self.facts), "noise_level": self.noise_level, "ate": float(agg["ate"]),
               "low": float(agg["low"]), "high": float(agg["high"])}
        ls = GROUPS.index("last_subject")
        for ki, k in enumerate(self.kinds):
            a = agg["aie"][ki].nan_to_num(float("-inf"))
            g, l = divmod(int(a.argmax()), a.shape[1])
            sl = int(a[ls].argmax())
            out[k] = {"peak_group": GROUPS[g], "peak_layer": l, "peak_aie": float(a[g, l]),
                      "subject_layer": sl, "subject_aie": float(a[ls, sl])}
        return out

    def plot(self, out_dir) -> list:
        from interpkit.analyses.causal_tracing.plots import plot_heatmaps, plot_lines

        return plot_heatmaps(self, out_dir) + plot_lines(self, out_dir)


# --------------------------------------------------------------------------------------------------
# the analysis
# --------------------------------------------------------------------------------------------------
def dataset_pass(lm, prompts, max_rows: int = 256) -> tuple[float, torch.Tensor]:
    """(std of the subject tokens' embeddings pooled over the dataset, clean top-1 id per prompt).

    One batched pass over the PromptSet (one forward per max_rows prompts; one request remotely).
    Position ids count from each prompt's first real token, so left padding does not move positions.
    """
    outs = run_traces(lm.model, _dataset_trace, [(b,) for b in subject_batches(prompts, max_rows)[1]], lm.remote)
    stats = torch.stack([o[0] for o in outs]).sum(0)
    n, s1, s2 = stats.tolist()
    std = math.sqrt(max(s2 - s1 * s1 / n, 0.0) / max(n - 1, 1))
    return std, torch.cat([o[1] for o in outs])


def _dataset_trace(model, batch):
    with model.trace(batch.inputs, logits_to_keep=1):
        e = model.embed.output
        x = e[batch.subject.to(e.device)].double()
        stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()]).cpu().save()
        top1 = model.output.logits[:, -1].argmax(-1).cpu().save()
    return stats, top1


def noise_level(lm, prompts, cfg: TraceConfig, subject_std: float | None = None) -> float:
    mode, value = parse_noise(cfg.noise)
    if mode in MODEL_RULES or cfg.replace:
        return build_noise_model(lm, prompts, cfg)
    if mode == "fixed":
        return value
    if subject_std is None:
        subject_std = dataset_pass(lm, prompts)[0]
    return value * subject_std


def trace_facts(lm, facts: list[Fact], cfg: TraceConfig, level: float, answers: list[int] | None = None,
                restorations=None) -> list[FactTrace]:
    """Trace a chunk of facts (one request remotely). ``restorations`` overrides the (kind, token, layer)
    grid (a function fact -> list of restorations; then scores are [1, R, 1] in restoration order)."""
    kinds, L, d = cfg.all_kinds(), lm.arch.n_layers, lm.arch.d_model
    todo = []
    for i, f in enumerate(facts):
        rest = restorations(f) if restorations is not None else grid(kinds, len(f.ids), L)
        ans = torch.tensor([-1]) if answers is None else torch.as_tensor(answers[i], dtype=torch.long).view(-1)
        todo.append(FactJob(answer_fact(f, ans), fact_noise(cfg, f, d, level), rest, ans))
    results = trace_facts_prefix(lm, todo, cfg) if cfg.engine == "prefix" else trace_batched(lm, todo, cfg)
    traces = []
    for f, r in zip(facts, results):
        vals = r.values.float()
        scores = vals.view(1, -1, 1) if restorations is not None else vals.view(len(kinds), len(f.ids), L)
        tok = lm.tokenizer.convert_ids_to_tokens(f.ids.tolist())
        traces.append(FactTrace(index=f.index, key=f.key, tokens=tok, subject_first=f.subject_first,
                                subject_last=f.subject_last, answer_id=r.answer, kinds=kinds,
                                scores=scores, low=r.low, high=r.high))
    return traces


def trace_batched(lm, todo: list[FactJob], cfg: TraceConfig) -> list[FactScores]:
    """Every restoration as batch rows of as few forwards as max_rows allows; one request remotely."""
    S, L = cfg.samples, lm.arch.n_layers
    forwards, bounds = [], []
    for job in todo:
        fj = fact_forwards(job, cfg, L)
        bounds.append((len(forwards), len(forwards) + len(fj), job.restorations))
        forwards += [fwd for fwd, _ in fj]
    outs = run_forwards(lm.model, forwards, lm.remote)
    results = []
    for lo, hi, rest in bounds:
        probs = [outs[j][0].double() for j in range(lo, hi)]         # means in float64: exact for equal rows
        vals = torch.cat([p[1 + S:].view(-1, S).mean(1) for p in probs]) if rest else torch.zeros(0)
        results.append(FactScores(vals, float(probs[0][1:1 + S].mean()), float(probs[0][0]),
                                  int(outs[lo][1].view(-1)[0])))
    return results


def run_causal_tracing(lm, prompts, cfg: TraceConfig, *, subject_std: float | None = None,
                       on_chunk=None, skip_chunk=None, noise=None, log=None) -> TraceResult:
    """Trace every fact of ``prompts`` (a PromptSet with subject roles), ``cfg.facts_per_chunk`` at a time.

    ``on_chunk(i, traces, seconds)`` is called after each chunk; ``skip_chunk(i)`` returning a list of
    FactTrace (e.g. read back from a RunStore) skips computing that chunk. ``log`` (a print function)
    turns on progress (a bar on a terminal) and the count of reused chunks.
    """
    cfg.validate()
    t0 = time.perf_counter()
    level = noise if noise is not None else noise_level(lm, prompts, cfg, subject_std)   # noise: a NoiseModel
    t_level = time.perf_counter() - t0
    facts = facts_of(prompts)
    answers = prompts.answer_ids[:, 0].tolist() if cfg.answer == "given" else None
    if prompts.multi_token:                         # your own data: the whole given answer, teacher forced
        answers = prompts.sequences("answer")
    out = []
    n = cfg.facts_per_chunk
    starts = list(range(0, len(facts), n))
    stored = {c: skip_chunk(c) for c in range(len(starts))} if skip_chunk is not None else {}
    stored = {c: v for c, v in stored.items() if v is not None}
    if stored and log is not None:
        log(f"reusing {len(stored)} stored chunk(s) of {len(starts)} ({sum(len(v) for v in stored.values())} facts)")
    with stage("causal tracing", len(facts) - sum(len(v) for v in stored.values()), "facts",
               enabled=log is not None) as bar:
        for c, start in enumerate(starts):
            if c in stored:
                out += stored[c]
                continue
            t1 = time.perf_counter()
            chunk = trace_facts(lm, facts[start:start + n], cfg, level,
                                None if answers is None else answers[start:start + n])
            if on_chunk is not None:
                on_chunk(c, chunk, time.perf_counter() - t1)
            bar.advance(len(chunk))
            out += chunk
    return TraceResult(config=cfg, noise_level=float(level), kinds=cfg.all_kinds(), facts=out,
                       timings={"noise_level_s": t_level, "trace_s": time.perf_counter() - t0 - t_level})

