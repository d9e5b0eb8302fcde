"""Which facts a model knows, and the subject-embedding spread, computed once per (model, dataset).

Causal tracing needs two dataset-wide numbers before it traces anything: the std of the subject tokens'
embeddings (the noise scale, ROME's 3 sigma) and, per fact, whether the model's clean top-1 token is the
attribute (ROME keeps only those). The std needs only the embedding layer, so it comes from traces that
stop right after it. The filter needs full forwards, so it scans the dataset in order, chunk by chunk,
and stops as soon as it has the facts asked for. Both are cached on disk under
``~/.cache/interpkit/known/<model fingerprint>-<dataset fingerprint>.json``: a later run, or a run
with other options (noise, kinds, samples...), reuses them and only scans further when it needs more
facts. Results equal a full pass: the first N known facts in dataset order, the std over every subject.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from interpkit.paths import user_cache
from interpkit.progress import stage


@dataclass
class KnownScan:
    """What is known so far about one (model, dataset): the std and the top-1 of a prefix of the dataset."""

    n_dataset: int
    subject_std: float | None = None
    top1: list[int] = field(default_factory=list)       # clean top-1 of prompts 0..len(top1)-1

    def known_rows(self, answers: torch.Tensor) -> list[int]:
        return [i for i, t in enumerate(self.top1) if t == int(answers[i, 0])]


def model_fingerprint(lm) -> str:
    """A hash of the config and a sample of every weight (remote models: their id and revision)."""
    h = hashlib.sha256(json.dumps(lm.hf.config.to_dict(), sort_keys=True, default=str).encode())
    if lm.remote is True:
        h.update(f"{lm.name}@{lm.revision}".encode())
        return h.hexdigest()[:16]
    for name, p in sorted(lm.hf.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().flatten()[:: max(1, p.numel() // 512)].float().numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_fingerprint(prompts) -> str:
    h = hashlib.sha256(prompts.input_ids.numpy().tobytes())
    h.update(prompts.attention_mask.numpy().tobytes())
    h.update(prompts.answer_ids.numpy().tobytes())
    return h.hexdigest()[:16]


def scan_known(lm, prompts, want: int | None, subject_mask: torch.Tensor, chunk: int = 64, log=print,
               cache: bool = True) -> tuple[KnownScan, dict]:
    """(scan, stats) with the std and enough of the filter for ``want`` known facts (None: all).

    ``subject_mask`` [N, T] marks the subject tokens. ``stats`` says what was reused and computed.
    """
    path = user_cache("known") / f"{model_fingerprint(lm)}-{dataset_fingerprint(prompts)}.json"
    scan = read_cached_scan(path, len(prompts)) if cache else None
    stats = {"cached_std": scan is not None and scan.subject_std is not None,
             "cached_top1": len(scan.top1) if scan else 0, "scanned": 0}
    scan = scan or KnownScan(n_dataset=len(prompts))
    if scan.subject_std is None:
        scan.subject_std = _subject_std(lm, prompts, subject_mask, chunk * 4)
        _write(path, scan, cache)
    enough = lambda: want is not None and len(scan.known_rows(prompts.answer_ids)) >= want  # noqa: E731
    remaining = len(prompts) - len(scan.top1)
    if not enough() and remaining > 0:
        with stage("known-fact filter", remaining, "prompts") as bar:
            while not enough() and len(scan.top1) < len(prompts):
                lo = len(scan.top1)
                rows = slice(lo, min(lo + chunk, len(prompts)))
                scan.top1 += _top1(lm, prompts, rows).tolist()
                stats["scanned"] += rows.stop - lo
                bar.advance(rows.stop - lo)
                _write(path, scan, cache)
    if stats["cached_top1"] or stats["cached_std"]:
        log(f"known facts: reused the cached filter of {stats['cached_top1']} prompts"
            f"{' and the noise scale' if stats['cached_std'] else ''} ({path.name}); scanned {stats['scanned']} more")
    return scan, stats


def _row_inputs(prompts, rows: slice) -> dict:
    mask = prompts.attention_mask[rows]
    return {"input_ids": prompts.input_ids[rows], "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


def _subject_std(lm, prompts, subject_mask: torch.Tensor, chunk: int) -> float:
    """Pooled std of every subject token's embedding (embedding-only traces: they stop after it)."""
    total = torch.zeros(3, dtype=torch.float64)
    for lo in range(0, len(prompts), chunk):
        rows = slice(lo, min(lo + chunk, len(prompts)))
        with torch.no_grad(), lm.model.trace(_row_inputs(prompts, rows), remote=lm.remote) as tracer:
            e = lm.model.embed.output
            x = e[subject_mask[rows].to(e.device)].double()
            stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()]).cpu().save()
            tracer.stop()
        total += stats
    n, s1, s2 = total.tolist()
    return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / max(n - 1, 1))


def _top1(lm, prompts, rows: slice) -> torch.Tensor:
    with torch.no_grad(), lm.model.trace(_row_inputs(prompts, rows), remote=lm.remote, logits_to_keep=1):
        top1 = lm.model.output.logits[:, -1].argmax(-1).cpu().save()
    return torch.as_tensor(top1)


def read_cached_scan(path: Path, n: int) -> KnownScan | None:
    """The cached scan at ``path`` if it is readable and of a dataset of ``n`` prompts, else None."""
    try:
        data = json.loads(path.read_text())
        scan = KnownScan(**data)
        return scan if scan.n_dataset == n and len(scan.top1) <= n else None
    except (OSError, ValueError, TypeError):
        return None                                  # missing or unreadable: recompute (never trusted)


def _write(path: Path, scan: KnownScan, enabled: bool) -> None:
    if not enabled:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(scan)))
    tmp.replace(path)
