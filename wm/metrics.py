"""Training metrics: a CSV row per epoch or generation, a PNG plot of it, and
the interquartile mean that scores are summarized by."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from wm.files import write_atomically  # noqa: E402


class MetricsLog:
    """Append rows to a CSV; on resume, rows from epochs that will be redone are
    dropped so the file never holds the same epoch twice."""

    def __init__(self, path: str | os.PathLike, step_key: str = "epoch"):
        self.path = Path(path)
        self.step_key = step_key

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step` (called on resume and on restart)."""
        rows = [r for r in self.rows() if int(float(r[self.step_key])) <= step]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        self._write(rows, list(rows[0].keys()))

    def append(self, row: dict) -> None:
        self.extend([row])

    def extend(self, new_rows: list[dict]) -> None:
        """Append several rows with one rewrite of the file."""
        if not new_rows:
            return
        rows = self.rows()
        fields = list(rows[0].keys()) if rows else list(new_rows[0].keys())
        for row in new_rows:
            fields += [k for k in row if k not in fields]
        rows += new_rows
        self._write([{k: row.get(k, "") for k in fields} for row in rows], fields)

    def _write(self, rows, fields) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)

        write_atomically(self.path, write)

    def plot(self, png: str | os.PathLike, series: list[str], title: str = "",
             ylabel: str = "", logy: bool = False) -> None:
        """Plot the named columns against the step column."""
        rows = self.rows()
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [float(r[self.step_key]) for r in rows]
        for name in series:
            pts = [(x, float(r[name])) for x, r in zip(xs, rows) if r.get(name) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=name)
        ax.set_xlabel(self.step_key)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, png)


def save_figure(fig, png: str | os.PathLike) -> None:
    try:
        write_atomically(png, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def image_grid(rows: list, png: str | os.PathLike, labels: list[str] | None = None,
               scale: int = 2) -> None:
    """Save rows of (H, W, 3) uint8 images as one PNG grid, a label per row."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows = [np.concatenate(list(r), axis=1) for r in rows]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if labels:
        pad = 90
        canvas = Image.new("RGB", (grid.width + pad, grid.height), "white")
        canvas.paste(grid, (pad, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = grid.height / len(rows)
        for i, label in enumerate(labels):
            draw.text((4, int(i * row_h + row_h / 2) - 5), label, fill="black")
        grid = canvas
    write_atomically(png, grid.save)


def interquartile_mean(scores: list[float]) -> tuple[float, tuple[float, float]]:
    """The mean of the middle half of the scores, and its 95% bootstrap
    confidence interval (scipy's BCa over 10,000 resamples, fixed seed): the
    summary that rliable recommends and lucid-dream-racer reports."""
    from scipy import stats

    x = np.asarray(scores, dtype=np.float64)
    iqm = lambda x, axis=-1: stats.trim_mean(x, 0.25, axis=axis)  # noqa: E731
    if len(x) < 2 or np.ptp(x) == 0:  # no spread, nothing to resample
        return float(iqm(x)), (float(x.min()), float(x.max()))
    ci = stats.bootstrap((x,), iqm, n_resamples=10_000, confidence_level=0.95,
                         rng=np.random.default_rng(0)).confidence_interval
    return float(iqm(x)), (float(ci.low), float(ci.high))
