"""The PNG plots of `speed --plot`: matplotlib with its file backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..support.errors import DecoError


def subplots(*args, **kwargs):
    """matplotlib's subplots, on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, constrained_layout=True, **kwargs)


def save(fig, path: str | Path) -> None:
    """Write the figure as a PNG and release it; DecoError when the file cannot be written."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise DecoError(f"{path}: cannot write the plot ({e.strerror})") from None
    finally:
        plt.close(fig)
