"""The comparison: PPO on pixels, on z and on [z, h] beside CMA-ES's C, as
episode return against game frames, and the table of final scores.

Reads experiments/train_ppo.py's runs (RUNS_DIR/ARM/seedN: episodes.csv, run.json, and
scores.json and scores_stochastic.json where `evaluate.py --policy ppo
[--stochastic] --json` wrote them) and CMA-ES's
controller_metrics.csv files, with the scores.json that evaluate.py wrote
beside them. Writes OUT.png and OUT.md (also printed).

The curves, all against game frames (the environment's own steps), on a log
scale, so that a PPO run of a million frames and a CMA-ES run of tens of
millions both show:
- a PPO arm: each seed's mean return over its last --window training
  episodes, at the frames trained when the last of them ended (agent steps
  times the frame skip); the line is the mean over seeds, the band their
  minimum and maximum, up to the shortest seed;
- CMA-ES: the population's mean return in each generation, at the real
  frames used so far (`frames`, held-out evaluations included); the dots
  are the CMA-ES mean's score on the held-out tracks. Several files of one
  features are seeds, drawn like PPO's.
Both are returns of training episodes: PPO's with its exploration noise,
CMA-ES's of members drawn around its mean.

The table: each policy's score over evaluate.py's tracks (0-99 on the
official CarRacing-v3), every seed's episodes pooled: mean +- std and the
interquartile mean with its 95% bootstrap interval. A PPO arm has two rows,
its mean action and its sampled actions (--stochastic). --at FRAMES,...
also prints each PPO arm's curve at those frames, as numbers.

usage: python -m experiments.compare_ppo --runs-dir checkpoints/ppo --cmaes zh=checkpoints/pretrained/road_view/controller_metrics.csv
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wm.checkpoint import load_checkpoint
from wm.cli import AT_LEAST_1, fail, run_main
from wm.files import writable_file, write_atomically
from wm.metrics import MetricsLog, interquartile_mean, save_figure
from wm.ppo import ARMS, EPISODES_FILE, RUN_FILE

LABELS = {"pixels": "PPO on pixels (CNN)", "z": "PPO on z", "zh": "PPO on [z, h]"}
FEATURES = {"zh": "[z, h]"}  # train_controller.py's --features, as the table and legend name them
# How evaluate.py scores a PPO run -> (the row's label after the arm's, its extra flag, the JSON it writes).
PPO_SCORES = [("mean action", "", "scores.json"), ("sampled actions", " --stochastic", "scores_stochastic.json")]


@dataclass
class Config:
    runs_dir: str = "checkpoints/ppo"  # experiments/train_ppo.py's --out-dir, holding ARM/seedN run folders
    cmaes: str = "zh=checkpoints/pretrained/road_view/controller_metrics.csv"  # CMA-ES runs: FEATURES=CSV,...; two of one FEATURES are 2 seeds
    window: int = 20  # training episodes in each point of a PPO curve (SB3's ep_rew_mean: 100)
    out: str = "checkpoints/ppo/comparison"  # writes OUT.png (the curves) and OUT.md (the table)
    at: str = ""  # frames, e.g. 100000,200000: also print each PPO arm's curve there, the mean over seeds (each seed's)

    # The range of each number option, checked in one line before main runs.
    RANGES = {"window": AT_LEAST_1}


def ppo_runs(runs_dir: Path) -> dict[str, list[Path]]:
    """arm -> its run folders that have training episodes, by seed."""
    runs = {}
    for arm in ARMS:
        found = sorted((p for p in (runs_dir / arm).glob("seed*")
                        if (p / EPISODES_FILE).is_file() and (p / RUN_FILE).is_file()),
                       key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
        if found:
            runs[arm] = found
    return runs


def cmaes_runs(text: str) -> dict[str, list[Path]]:
    """features -> its controller_metrics.csv files, from --cmaes."""
    runs: dict[str, list[Path]] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        features, sep, path = item.partition("=")
        if not sep or not path:
            raise fail(f"--cmaes takes FEATURES=CSV[,FEATURES=CSV...], got {item!r}")
        if not Path(path).is_file():
            raise fail(f"{path} not found; train_controller.py writes it in its --ckpt-dir")
        runs.setdefault(features, []).append(Path(path))
    return runs


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    return (c[end] - c[start]) / (end - start)


def band(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 200):
    """Curves of several seeds on one grid of frames, where all have data ->
    (frames, mean, min, max) over seeds."""
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([hi])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # (seeds, points)
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def ppo_curve(run_dir: Path, window: int) -> tuple[np.ndarray, np.ndarray]:
    rows = MetricsLog(run_dir / EPISODES_FILE, step_key="frames").rows()
    x = np.array([float(r["frames"]) for r in rows])
    return x, rolling_mean(np.array([float(r["return"]) for r in rows]), window)


def cmaes_curve(csv: Path) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """-> (frames, population mean return, [(frames, held-out score)])."""
    rows = MetricsLog(csv, step_key="generation").rows()
    x = np.array([float(r["frames"]) for r in rows])
    held = [(float(r["frames"]), float(r["held_out"])) for r in rows if r.get("held_out") not in (None, "")]
    return x, np.array([float(r["mean"]) for r in rows]), held


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def plot(ppo: dict[str, list[Path]], cmaes: dict[str, list[Path]], window: int, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, runs in ppo.items():
        curves = [c for c in (ppo_curve(r, window) for r in runs) if len(c[0])]
        if curves:
            x, mean, low, high = band(curves)
            line, = ax.plot(x, mean, label=f"{LABELS[arm]} ({plural(len(curves), 'seed')})")
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    for features, csvs in cmaes.items():
        name, runs = FEATURES.get(features, features), [cmaes_curve(c) for c in csvs]
        curves = [(x, y) for x, y, _ in runs if len(x)]
        if not curves:
            continue
        x, mean, low, high = band(curves)
        line, = ax.plot(x, mean, "--", label=f"CMA-ES on {name} ({plural(len(curves), 'run')}): population mean")
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        held = [p for _, _, h in runs for p in h]
        if held:
            ax.plot(*zip(*held), "o", ms=3, color=line.get_color(), label=f"CMA-ES on {name}: held-out score")
    ax.set_xscale("log")
    ax.set_xlabel("game frames, log scale (PPO: agent steps x frame skip; CMA-ES: real frames, held-out included)")
    ax.set_ylabel("episode return")
    ax.set_title(f"CarRacing-v3 training episodes: mean over seeds, band min-max\n"
                 f"(PPO: its last {window} episodes)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


def score_row(label: str, score_files: list[Path], frames: list[int], flags: str) -> str:
    """One row of the table: the episodes of every seed pooled; the command
    that scores a seed not scored yet."""
    trained = " / ".join(f"{f:,}" for f in frames)
    missing = [p for p in score_files if not p.is_file()]
    if missing:
        return (f"| {label} | {len(score_files)} | {trained} | to be run: python evaluate.py {flags} "
                f"--ckpt-dir {missing[0].parent} --episodes 100 --json {missing[0]} | | |")
    results = [json.loads(p.read_text()) for p in score_files]
    scores = [s for r in results for s in r["scores"]]
    iqm, (low, high) = interquartile_mean(scores)
    per_seed = ", ".join(f"{r['mean']:.1f}" for r in results)
    return (f"| {label} | {len(results)} | {trained} | {np.mean(scores):.1f} ± {np.std(scores):.1f} | "
            f"{iqm:.1f} [{low:.1f}, {high:.1f}] | {per_seed} |")


def scored_frames(csv: Path) -> int:
    """The real frames a CMA-ES run had used when it saved the C that
    evaluate.py scores (controller.pt beside the CSV: the best held-out score,
    not always the last generation); the last generation's without one."""
    rows = MetricsLog(csv, step_key="generation").rows()
    if not rows:
        return 0
    ckpt = csv.parent / "controller.pt"
    generation = load_checkpoint(ckpt, "controller").get("generation") if ckpt.is_file() else None
    row = next((r for r in rows if int(float(r["generation"])) == generation), rows[-1])
    return int(float(row["frames"]))


def table(ppo: dict[str, list[Path]], cmaes: dict[str, list[Path]]) -> str:
    lines = ["| policy | seeds | frames trained (each) | score, mean ± std (all episodes) | IQM [95% CI] | per seed |",
             "|---|---|---|---|---|---|"]
    for arm, runs in ppo.items():
        frames = [json.loads((r / RUN_FILE).read_text())["frames_trained"] for r in runs]
        for how, flag, name in PPO_SCORES:
            lines.append(score_row(f"{LABELS[arm]}, {how}", [r / name for r in runs], frames, "--policy ppo" + flag))
    for features, csvs in cmaes.items():
        frames = [scored_frames(c) for c in csvs]
        lines.append(score_row(f"CMA-ES on {FEATURES.get(features, features)}",
                               [c.parent / "scores.json" for c in csvs], frames, "--policy agent"))
    return "\n".join(lines) + "\n"


def returns_at(ppo: dict[str, list[Path]], window: int, frames: list[int]) -> str:
    """Each PPO arm's curve (the mean return of the last `window` training
    episodes) at the given frames: the mean over seeds, then each seed's;
    empty where a seed has no episode that early or has not trained that far."""
    curves = {arm: [ppo_curve(r, window) for r in runs] for arm, runs in ppo.items()}
    lines = ["| frames | " + " | ".join(LABELS[arm] for arm in curves) + " |", "|---|" + "---|" * len(curves)]
    for f in frames:
        cells = []
        for runs in curves.values():
            ys = [float(np.interp(f, x, y)) for x, y in runs if len(x) and x[0] <= f <= x[-1]]
            cells.append(f"{np.mean(ys):.0f} ({', '.join(f'{y:.0f}' for y in ys)})" if len(ys) == len(runs) else "")
        lines.append(f"| {f:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> str:
    try:
        at = [int(s) for s in cfg.at.split(",") if s.strip()]
    except ValueError:
        raise fail(f"--at takes frames separated by commas, e.g. 100000,200000, got {cfg.at!r}") from None
    ppo, cmaes = ppo_runs(Path(cfg.runs_dir)), cmaes_runs(cfg.cmaes)
    if not ppo and not cmaes:
        raise fail(f"no runs with training episodes in {cfg.runs_dir}; run experiments/train_ppo.py first")
    out = Path(cfg.out)
    for path in (out.with_suffix(".png"), out.with_suffix(".md")):
        writable_file(path, "--out")
    plot(ppo, cmaes, cfg.window, out.with_suffix(".png"))
    text = table(ppo, cmaes)
    write_atomically(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    print(text + f"\ncurves: {out.with_suffix('.png')}, table: {out.with_suffix('.md')}")
    if at:
        print(f"\ntraining return (last {cfg.window} episodes) at these frames, mean over seeds (each seed):\n"
              + returns_at(ppo, cfg.window, at))
    return text


if __name__ == "__main__":
    run_main(main, Config)
