"""Train a sparse autoencoder on a model's residual stream at one layer, offline and resumably.

Corpus (all offline): ``calendar`` (the days/months arithmetic prompts plus "<day> comes after <day>"
style sentences, so day and month tokens occur in many contexts), ``tasks`` (``tasks.corpus()``, the
built-in tasks' text), ``generated`` (text sampled from the model itself from short seed prompts) or
``file:PATH`` (one document per line); join several with ``+``. Activations of every non-pad token
(the first position, an attention sink with an outsized norm, is dropped) are cached in the run
directory, then the SAE trains on shuffled minibatches (Adam). ``topk`` SAEs minimise the MSE with
exactly k active latents; ``standard`` (ReLU) ones add ``l1 * sum_i f_i ||W_dec_i||``. A checkpoint
(weights, Adam moments, step) is written every ``save_every`` steps; rerunning the same command resumes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from interpkit.analyses.sae.load import SAE, SAESpec, load_sae, save_sae
from interpkit.errors import UserError


@dataclass
class SAETrainConfig:
    layer: int = 1                     # residual index: 0 = embeddings, l = output of block l-1
    width: int = 512                   # d_sae
    architecture: str = "topk"         # topk | standard (L1)
    k: int = 16
    l1: float = 3e-3
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    corpus: str = "calendar+tasks"
    max_docs: int = 2000
    max_tokens: int = 48               # per document
    generated_docs: int = 64           # for the "generated" corpus
    save_every: int = 500

    def validate(self, n_layers: int) -> None:
        if not 0 <= self.layer <= n_layers:
            raise UserError(f"layer {self.layer} is out of range; residual layers are 0..{n_layers}")
        if self.architecture not in ("topk", "standard"):
            raise UserError(f"architecture {self.architecture!r}: train topk or standard (L1) SAEs")
        if self.width < 1 or self.steps < 1 or self.batch_size < 1:
            raise UserError("width, steps and batch_size must be >= 1")
        if self.architecture == "topk" and not 1 <= self.k <= self.width:
            raise UserError(f"k={self.k} must be in 1..width ({self.width})")


# ------------------------------------------------------------------------------------------------
# corpus and activations
# ------------------------------------------------------------------------------------------------
def calendar_text() -> list[str]:
    from interpkit.tasks.calendar import DAYS, MONTHS, problems

    lines = [p[0] for kind in ("days", "months") for p in problems(kind)]
    for words in (DAYS, MONTHS):
        p = len(words)
        for i, w in enumerate(words):
            lines += [f"{w} comes after {words[i - 1]} and before {words[(i + 1) % p]}.",
                      f"We met on {w}, and again the next {words[(i + 2) % p]}.",
                      f"The meeting moved from {words[(i + 3) % p]} to {w}."]
    return lines


def generated_text(lm, n_docs: int, max_tokens: int, seed: int) -> list[str]:
    """Text the model writes itself from short seed prompts (sampling, temperature 1)."""
    seeds = ["The", "Once upon a time", "On Monday", "In March", "The city of", "Today we", "My favourite",
             "Scientists have", "The history of", "In the morning"]
    tok, out = lm.tokenizer, []
    torch.manual_seed(seed)
    for i in range(n_docs):
        enc = tok(seeds[i % len(seeds)], return_tensors="pt")
        with torch.no_grad():
            gen = lm.hf.generate(**enc, do_sample=True, max_new_tokens=max_tokens, top_k=0,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


def build_corpus(spec: str, lm=None, *, n_generated: int = 64, max_tokens: int = 48, seed: int = 0) -> list[str]:
    docs: list[str] = []
    for part in spec.split("+"):
        part = part.strip()
        if part == "calendar":
            docs += calendar_text()
        elif part == "tasks":
            from interpkit.tasks import corpus
            docs += corpus()
        elif part == "generated":
            if lm is None:
                raise UserError("the generated corpus needs a model")
            docs += generated_text(lm, n_generated, max_tokens, seed)
        elif part.startswith("file:"):
            path = Path(part[5:])
            if not path.exists():
                raise UserError(f"corpus file {path} does not exist")
            docs += [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        else:
            raise UserError(f"unknown corpus {part!r}; use calendar, tasks, generated or file:PATH (join with +)")
    if not docs:
        raise UserError(f"corpus {spec!r} is empty")
    return docs


def trace_layer(model, inputs: dict, layer: int, n_layers: int):
    """Residual [B, T, d] at residual index ``layer`` (stops the forward there)."""
    from interpkit.sites import site

    with model.trace(inputs) as tracer:
        h = (site(model, "resid_pre", layer) if layer < n_layers else
             site(model, "resid_post", n_layers - 1)).detach().cpu().save()
        tracer.stop()
    return h


@dataclass
class Activations:
    acts: torch.Tensor          # [n, d]
    token_ids: torch.Tensor     # [n]
    doc: torch.Tensor           # [n] document index
    pos: torch.Tensor           # [n] position in the document


def collect(lm, docs: list[str], layer: int, max_tokens: int, batch: int = 32, progress: bool = True) -> Activations:
    """Activations of every real token but the first of each document, ``batch`` documents per trace."""
    from rich.progress import track

    tok = lm.tokenizer
    pad_side = getattr(tok, "padding_side", "left")
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    acts, ids_out, doc_out, pos_out = [], [], [], []
    starts = list(range(0, len(docs), batch))
    try:
        for s in (track(starts, description="activations") if progress else starts):
            enc = tok(docs[s:s + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            with torch.no_grad():
                h = trace_layer(lm.model, inputs, layer, lm.arch.n_layers)
            keep = enc["attention_mask"].bool()
            keep[:, 0] = False
            r, c = keep.nonzero(as_tuple=True)
            acts.append(h[r, c].float())
            ids_out.append(enc["input_ids"][r, c])
            doc_out.append(r + s)
            pos_out.append(c)
    finally:
        tok.padding_side = pad_side
    return Activations(torch.cat(acts), torch.cat(ids_out), torch.cat(doc_out), torch.cat(pos_out))


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
@dataclass
class SAEStats:
    mse: float                  # mean squared error per element
    fvu: float                  # fraction of variance unexplained
    l0: float                   # mean number of active latents per token
    dead: float                 # fraction of latents that never fire on the data


@torch.no_grad()
def sae_stats(sae: SAE, X: torch.Tensor, chunk: int = 4096) -> SAEStats:
    se = l0 = 0.0
    fired = torch.zeros(sae.spec.d_sae, dtype=torch.bool)
    for s in range(0, len(X), chunk):
        x = X[s:s + chunk]
        rec, f = sae(x)
        se += float((rec - x).pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    var = float((X - X.mean(0)).pow(2).sum())
    return SAEStats(mse=se / X.numel(), fvu=se / max(var, 1e-12), l0=l0 / len(X), dead=float((~fired).float().mean()))


def _loss(sae: SAE, x: torch.Tensor, cfg: SAETrainConfig) -> torch.Tensor:
    rec, f = sae(x)
    loss = (rec - x).pow(2).sum(-1).mean()
    if cfg.architecture == "standard":
        loss = loss + cfg.l1 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return loss


def train_sae(X: torch.Tensor, cfg: SAETrainConfig, spec: SAESpec, *, folder: Path | None = None,
              progress: bool = True) -> tuple[SAE, list[dict]]:
    """Train on activations X [n, d]; with ``folder``, checkpoint there and resume from it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import load_file, save_file

    sae = SAE(spec)
    sae.init_weights(cfg.seed, X.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    step, history = 0, []
    ck = folder / "checkpoint" if folder is not None else None
    if ck is not None and (ck / "state.json").exists():
        sae = load_sae(ck)
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        meta = json.loads((ck / "state.json").read_text())
        t = load_file(str(ck / "adam.safetensors"))
        params = [n for n, _ in sae.named_parameters()]
        opt.load_state_dict({"state": {i: {"step": t[f"{n}.step"], "exp_avg": t[f"{n}.exp_avg"],
                                           "exp_avg_sq": t[f"{n}.exp_avg_sq"]} for i, n in enumerate(params)
                                       if f"{n}.step" in t},
                             "param_groups": [{**opt.param_groups[0], "params": list(range(len(params)))}]})
        step, history = meta["step"], meta["history"]
    bar = Progress(TextColumn("[bold]sae"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), disable=not progress)
    with bar:
        task = bar.add_task("sae", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            x = X[torch.randint(len(X), (cfg.batch_size,), generator=g)]
            loss = _loss(sae, x, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sae.normalize_decoder()
            step += 1
            if step % 100 == 0 or step == cfg.steps:
                history.append({"step": step, "loss": round(loss.item(), 6)})
                bar.update(task, completed=step, info=f"loss {loss.item():.4g}")
            if ck is not None and (step % cfg.save_every == 0 or step == cfg.steps):
                _checkpoint(sae, opt, ck, step, history, save_sae, save_file)
    return sae.eval(), history


def _checkpoint(sae, opt, ck: Path, step: int, history: list, save_sae, save_file) -> None:
    import shutil

    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_sae(sae, tmp)
    names = [n for n, _ in sae.named_parameters()]
    st = opt.state_dict()["state"]
    tensors = {f"{names[i]}.{k}": torch.as_tensor(v).contiguous() for i, s in st.items() for k, v in s.items()}
    save_file(tensors, str(tmp / "adam.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    shutil.rmtree(ck, ignore_errors=True)
    tmp.rename(ck)


def config_dict(cfg: SAETrainConfig) -> dict:
    return asdict(cfg)
