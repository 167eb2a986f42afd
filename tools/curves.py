"""CMA-ES runs side by side, generation by generation: the population's mean
fitness (runs with the same --seed drive the same tracks each generation, so
their means compare on equal terms) and the held-out score, as a PNG and as
a table every --every generations.

usage: python -m tools.curves --runs shipped=checkpoints/pretrained,full_view=checkpoints/pretrained/full_view,road_view=checkpoints/pretrained/road_view
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wm.cli import AT_LEAST_1, NON_NEGATIVE, fail, run_main
from wm.metrics import MetricsLog, save_figure


@dataclass
class Config:
    runs: str = "shipped=checkpoints/pretrained,full_view=checkpoints/pretrained/full_view,road_view=checkpoints/pretrained/road_view"  # comma-separated label=folder of a controller_metrics.csv
    until: int = 0  # the last generation shown (0: the shortest run's last)
    every: int = 5  # a table row every this many generations

    # The range of each number option, checked in one line before main runs.
    RANGES = {"until": NON_NEGATIVE, "every": AT_LEAST_1}
    png: str = ""  # write the plot here


def read_runs(spec: str) -> dict[str, list[dict[str, str]]]:
    runs = {}
    for item in spec.split(","):
        label, _, folder = item.partition("=")
        path = Path(folder) / "controller_metrics.csv"
        if not label or not folder:
            raise fail(f"--runs takes label=folder pairs, got {item!r}")
        if not path.is_file():
            raise fail(f"{path} not found; give folders where train_controller.py ran")
        runs[label] = MetricsLog(path, step_key="generation").rows()
    return runs


def main(cfg: Config) -> dict:
    runs = read_runs(cfg.runs)
    until = cfg.until or min(len(rows) for rows in runs.values())
    table = {label: {int(r["generation"]): r for r in rows if int(r["generation"]) <= until}
             for label, rows in runs.items()}
    print(f"{'generation':>10}" + "".join(f"{label + ' mean':>22}{label + ' held-out':>22}" for label in table))
    for g in range(cfg.every, until + 1, cfg.every):
        cells = []
        for rows in table.values():
            r = rows.get(g, {})
            cells += [r.get("mean", ""), r.get("held_out", "")]
        print(f"{g:>10}" + "".join(f"{float(c):>22.1f}" if c else f"{'':>22}" for c in cells))
    if cfg.png:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows in table.items():
            gens = sorted(rows)
            line, = ax.plot(gens, [float(rows[g]["mean"]) for g in gens], label=f"{label}: population mean")
            held = [(g, float(rows[g]["held_out"])) for g in gens if rows[g].get("held_out")]
            if held:
                ax.plot(*zip(*held), "o--", color=line.get_color(), ms=4, label=f"{label}: held-out")
        ax.set_xlabel("generation")
        ax.set_ylabel("reward")
        ax.set_title("CMA-ES runs at equal generations (the same tracks each generation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, cfg.png)
    return table


if __name__ == "__main__":
    run_main(main, Config)
