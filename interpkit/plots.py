"""The one way figures are made and finished: pyplot on the Agg backend (figures are only saved), and
``finish`` (tight layout, saved at 120 dpi and closed, or returned open) or ``save_cropped`` (saved cropped
to the drawing at 130 dpi and closed)."""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish(fig, path=None, dpi: int = 120):
    """Lay out ``fig``; with a ``path``, save it there and close it (long runs make many figures).
    Returns the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


def save_cropped(fig, path, dpi: int = 130) -> str:
    """Save ``fig`` at ``path`` cropped to what is drawn (``bbox_inches="tight"``), close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return str(path)
