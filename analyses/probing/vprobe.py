"""V-probes (Allen-Zhu & Li, "Physics of Language Models" 2.1): nearly-linear probes of a frozen model.

The model is frozen. Two small things are trained on a labelled prompt set: a rank-r update of the input
embedding matrix (E + A B, A [vocab, r], B [r, d], B = 0 at the start so training starts from the
model itself) and a linear head (Adam). A starts at the scale of the embeddings, so a step of B changes the
inputs in proportion to them, whatever the model's embedding scale on the last position's final hidden state (after the final norm). Because
only a rank-r change of the inputs and a linear read-out are learned, high accuracy means the model
itself computes the property; the same probe on the same architecture with random weights is the
baseline that tells how much a frozen random network plus the probe could do alone.

The split is prompt-level. Training runs the HF module directly (gradients through the frozen model), so
V-probes are local-only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from interpkit.analyses.probing.linear import model_inputs, prompt_split, random_like
from interpkit.errors import UserError
from interpkit.progress import stage
from interpkit.plots import finish, pyplot


@dataclass
class VProbeConfig:
    """Options of a V-probe; every field is a CLI option."""

    rank: int = 8
    steps: int = 300
    lr: float = 1e-2                     # the head's learning rate
    embed_lr_scale: float = 0.1          # the rank-r update learns at lr * this (stabler; it acts everywhere)
    weight_decay: float = 1e-4
    test_frac: float = 0.2
    seed: int = 0
    batch_size: int | None = None        # None: full batch
    random_baseline: bool = True


@dataclass
class VProbeFit:
    train_acc: float
    test_acc: float
    history: list = field(default_factory=list)


@dataclass
class VProbeResult:
    """Accuracy of the V-probe on the model and (optionally) on the random-init baseline."""

    target: str
    config: VProbeConfig
    model: VProbeFit
    random: VProbeFit | None
    chance: float                       # best constant guess: the largest class share of the test rows
    n_train: int
    n_test: int
    trainable_params: int
    timings: dict = field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        rows = [{"model": "trained", "train_acc": self.model.train_acc, "test_acc": self.model.test_acc}]
        if self.random is not None:
            rows.append({"model": "random init", "train_acc": self.random.train_acc, "test_acc": self.random.test_acc})
        df = pd.DataFrame(rows)
        df["target"], df["chance"], df["rank"] = self.target, self.chance, self.config.rank
        return df

    def plot(self, path=None):
        plt = pyplot()
        df = self.to_dataframe()
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        x = range(len(df))
        ax.bar([i - 0.2 for i in x], df["train_acc"], 0.4, label="train")
        ax.bar([i + 0.2 for i in x], df["test_acc"], 0.4, label="test")
        ax.axhline(self.chance, color="k", ls=":", label="chance")
        ax.set_xticks(list(x), df["model"])
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"V-probe (rank {self.config.rank}) for {self.target!r}")
        ax.legend(fontsize=8)
        return finish(fig, path)


def fit_vprobe(hf: torch.nn.Module, inputs: dict, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
               cfg: VProbeConfig, n_classes: int) -> VProbeFit:
    """Train a rank-``cfg.rank`` embedding update and a linear head on a frozen ``hf``; rows train / test."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    E = hf.get_input_embeddings().weight.detach()
    base = hf.base_model
    g = torch.Generator().manual_seed(cfg.seed)
    scale = float(E.float().std()) / cfg.rank ** 0.5
    A = (torch.randn(E.shape[0], cfg.rank, generator=g) * scale).to(E.dtype).requires_grad_(True)
    B = torch.zeros(cfg.rank, E.shape[1], dtype=E.dtype, requires_grad=True)
    head = torch.nn.Linear(E.shape[1], n_classes).to(E.dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * E.shape[1] ** -0.5)
        head.bias.zero_()
    opt = torch.optim.Adam([{"params": [A, B], "lr": cfg.lr * cfg.embed_lr_scale},
                            {"params": list(head.parameters()), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    flags = [p.requires_grad for p in hf.parameters()]
    for p in hf.parameters():
        p.requires_grad_(False)
    was_training = hf.training
    hf.eval()

    def logits(rows):
        x = E[ids[rows]] + A[ids[rows]] @ B
        h = base(inputs_embeds=x, attention_mask=mask[rows], position_ids=pos[rows]).last_hidden_state[:, -1]
        return head(h)

    history = []
    try:
        with torch.enable_grad(), stage("V-probe training", cfg.steps, "steps") as bar:
            for step in range(cfg.steps):
                bar.advance()
                rows = train
                if cfg.batch_size is not None and len(train) > cfg.batch_size:
                    rows = train[torch.randperm(len(train), generator=g)[:cfg.batch_size]]
                loss = torch.nn.functional.cross_entropy(logits(rows), labels[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 50 == 0 or step == cfg.steps - 1:
                    history.append((step, loss.item()))
        with torch.no_grad():
            acc = lambda rows: float((logits(rows).argmax(-1) == labels[rows]).float().mean())  # noqa: E731
            return VProbeFit(train_acc=acc(train), test_acc=acc(test), history=history)
    finally:
        for p, f in zip(hf.parameters(), flags):
            p.requires_grad_(f)
        hf.train(was_training)


def run_vprobe(lm, prompts, labels, cfg: VProbeConfig | None = None, target: str = "label") -> VProbeResult:
    """V-probe ``labels`` [N] (any integer values) of ``prompts`` on ``lm``, and on a random-init copy."""
    cfg = cfg or VProbeConfig()
    if lm.remote:
        raise UserError("V-probes train through the model and run locally; drop --remote")
    if cfg.rank < 1 or cfg.steps < 1:
        raise UserError("V-probe rank and steps must be >= 1")
    inputs = model_inputs(prompts)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(labels) != inputs["input_ids"].shape[0]:
        raise UserError(f"{len(labels)} labels for {inputs['input_ids'].shape[0]} prompts")
    classes, y = torch.unique(labels, return_inverse=True)
    train, test = prompt_split(len(y), cfg.test_frac, cfg.seed)
    t0 = time.perf_counter()
    fit = fit_vprobe(lm.hf, inputs, y, train, test, cfg, len(classes))
    timings = {"model_s": time.perf_counter() - t0}
    rnd = None
    if cfg.random_baseline:
        t0 = time.perf_counter()
        rnd = fit_vprobe(random_like(lm, cfg.seed).hf, inputs, y, train, test, cfg, len(classes))
        timings["random_s"] = time.perf_counter() - t0
    d = lm.arch.d_model
    n_params = lm.hf.get_input_embeddings().weight.shape[0] * cfg.rank + cfg.rank * d + (d + 1) * len(classes)
    best_constant = float(torch.bincount(y[test]).max()) / len(test)     # never 0.000 (see probing.probe_layers)
    return VProbeResult(target=target, config=cfg, model=fit, random=rnd,
                        chance=best_constant, n_train=len(train), n_test=len(test),
                        trainable_params=n_params, timings=timings)


def vprobe_command(model: str, task: str, target: str, *, n: int | None = None, seed: int = 0,
                   cfg: VProbeConfig | None = None, root: str = "artifacts", lm=None, prompts=None) -> VProbeResult:
    """``interpkit vprobe --model M --task T --target META``: V-probe a meta field of a task's prompts."""
    from interpkit.analyses.probing.linear import labels_from_meta
    from interpkit.models import load_model
    from interpkit.store import RunStore

    cfg = cfg or VProbeConfig(seed=seed)
    lm = lm or load_model(model)
    if prompts is None:
        from interpkit.tasks import get_task
        prompts = get_task(task)(lm.tokenizer, **({} if n is None else {"n": n}))
    labels = labels_from_meta(prompts, [target], "one")[target]
    store = RunStore("vprobe", {"task": task, "target": target, "n": n, "vprobe": asdict(cfg)},
                     model=model, seed=seed, root=root)
    res = run_vprobe(lm, prompts, labels, cfg, target=target)
    arrays = {"train_acc": [res.model.train_acc], "test_acc": [res.model.test_acc]}
    if res.random is not None:
        arrays.update(random_train_acc=[res.random.train_acc], random_test_acc=[res.random.test_acc])
    if not store.has_chunk(0):                     # a rerun recomputes (deterministic) and keeps the stored chunk
        store.write_chunk(0, arrays)
    res.to_dataframe().to_csv(store.dir / "vprobe.csv", index=False)
    res.plot(store.dir / "vprobe.png")
    for k, v in res.timings.items():
        store.time(k, v)
    store.finish(**{k: v[0] for k, v in arrays.items()}, chance=res.chance, figure="vprobe.png")
    print(res.to_dataframe().to_string(index=False))
    print(f"results: {store.dir}")
    return res
