"""The one way figures are finished: tight layout, saved at 120 dpi and closed (or returned open)."""
from __future__ import annotations


def finish(fig, path=None):
    """Lay out ``fig``; with a ``path``, save it there and close it (long runs make many figures).
    Returns the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
