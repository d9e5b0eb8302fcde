"""``interpkit sae``: train, load and cluster sparse autoencoders (registered in cli.py)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sparse autoencoders on the residual stream; decoder-direction clusters (Engels et al.).")


@app.command()
def train(model: str = typer.Option(..., help="Hub id, local dir, tiny:<family> or smollm2-135m."),
          layer: int = typer.Option(..., help="Residual index: 0 = embeddings, l = output of block l-1."),
          width: int = typer.Option(512, help="Number of latents (d_sae)."),
          architecture: str = typer.Option("topk", help="topk | standard (ReLU + L1)."),
          k: int = typer.Option(16, help="topk: active latents per token."),
          l1: float = typer.Option(3e-3, help="standard: L1 coefficient."),
          steps: int = typer.Option(2000), batch_size: int = typer.Option(256), lr: float = typer.Option(1e-3),
          corpus: str = typer.Option("calendar+tasks", help="calendar | tasks | generated | file:PATH, joined by +."),
          max_docs: int = typer.Option(2000), max_tokens: int = typer.Option(48, help="Tokens per document."),
          generated_docs: int = typer.Option(64, help="Documents the model writes for the generated corpus."),
          seed: int = typer.Option(0), root: str = typer.Option("artifacts")) -> None:
    """Train an SAE (resumable: rerun the same command); saved in the sae_lens layout."""
    from interpkit.analyses.sae.command import sae_train_command
    from interpkit.analyses.sae.train import SAETrainConfig

    cfg = SAETrainConfig(layer=layer, width=width, architecture=architecture, k=k, l1=l1, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, corpus=corpus, max_docs=max_docs,
                         max_tokens=max_tokens, generated_docs=generated_docs)
    sae_train_command(model, cfg, root=root, echo=typer.echo)


@app.command()
def load(path: str = typer.Option(..., help="A folder with cfg.json + sae_weights.safetensors (sae_lens layout).")) -> None:
    """Load an SAE (ours or a public one downloaded in the sae_lens layout) and describe it."""
    from interpkit.analyses.sae.command import sae_load_command

    sae_load_command(path, echo=typer.echo)


@app.command()
def cluster(sae: str = typer.Option(..., help="An SAE folder (or an `sae train` run directory)."),
            model: str = typer.Option(None, help="Default: the model named in the SAE's cfg.json."),
            method: str = typer.Option("spectral", help="spectral | graph"),
            n_clusters: int = typer.Option(64, help="spectral: number of clusters."),
            cutoff: float = typer.Option(0.5, help="graph: cosine cutoff."),
            top_k: int = typer.Option(2, help="graph: link each latent to at most its top-k neighbours (0: all)."),
            corpus: str = typer.Option("calendar+tasks", help="Text for reconstructions when the run has none."),
            layer: int = typer.Option(None, help="Residual index (default from the SAE's hook name)."),
            max_clusters: int = typer.Option(40, help="Reconstruct the largest this many clusters."),
            seed: int = typer.Option(0), root: str = typer.Option("artifacts")) -> None:
    """Cluster decoder directions; reconstructions, PCA plots by token, irreducibility, circle search."""
    from interpkit.analyses.sae.command import sae_cluster_command

    sae_cluster_command(sae, model=model, method=method, n_clusters=n_clusters, cutoff=cutoff,
                        top_k=top_k or None, corpus=corpus, layer=layer, seed=seed, max_clusters=max_clusters,
                        root=root, echo=typer.echo)
