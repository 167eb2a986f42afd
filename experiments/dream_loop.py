"""Learn to drive in the dream, repairing M where the dream's C finds it wrong.

The paper's iterative procedure, for a C trained only inside M. Round r:

    1. data     noisy laps of a C in the real game, added to --data-dir:
                round 1's come from --first-driver (the shipped C), round
                r's from round r - 1's dream-trained C, so that M sees the
                states that C's exploits of M lead to in the real game
    2. M        --mdnrnn fine-tuned on every lap so far (train_mdnrnn.py
                --init-from; with --mixture frame, a per-frame mixture head
                on --mdnrnn's LSTM; with --head-only, that head alone trains)
    3. C        CMA-ES in that M's dream from zero weights (--carry-c: from
                the last round's C), dreams starting
                from real states of those laps (train_controller.py --mode
                dream --dream-start); the real game only picks the best
                CMA-ES mean on the held-out tracks
    4. truth    tools/dream_truth.py on that C's ladder, dreams from the same
                kind of start: rank correlation, exploit gap, faithful steps
    5. replays  with --replays N, experiments/dream_replays.py: that C's
                dreams from N real states of the laps, their actions played
                in the real game from the same states, added to --data-dir
                as rollouts, so that the next round's M learns what those
                actions really do where its dream was wrong (lucid-dream-
                racer's repair loop)

Each round is a folder (round_01, ...) under --out-dir with V (a link to
--vae), its M and its C; loop_metrics.csv gets a row per round with the real
frames of every step (laps, held-out scores, the truth's episodes and
replays) and their running total, and loop.png plots it. Every step resumes
or skips what is done, so rerunning the command after an interruption goes
on where it stopped.

usage: python -m experiments.dream_loop --rounds 10 --workers 2
       python -m experiments.dream_loop --compare laps=checkpoints/dream_loop,replays=checkpoints/dream_loop_replays --png loops.png
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models import MIXTURES, MDNRNNConfig
from wm.checkpoint import load_checkpoint
from wm.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, fail, flag, run_main
from wm.env import COLLECT_SEED
from wm.files import link, locked, writable_folder
from wm.metrics import MetricsLog, save_figure
from wm.rollouts import game_frames, rollout_path

ROOT = Path(__file__).resolve().parent.parent
FRAMES = ("lap_frames", "held_out_frames", "truth_frames", "replay_frames")  # a round's real frames, by use


@dataclass
class Config:
    out_dir: str = "checkpoints/dream_loop"  # a folder per round with its M and C, and the loop's metrics
    vae: str = "checkpoints/pretrained/vae.pt"  # V, the same in every round
    mdnrnn: str = "checkpoints/pretrained/mdnrnn.pt"  # the M that every round fine-tunes (trained with --vae)
    first_driver: str = "checkpoints/pretrained"  # the folder of the C whose laps are round 1's data
    data_dir: str = "data/dream_loop/rollouts"  # the real laps of every round
    latent_dir: str = "data/dream_loop/latents"  # V's codes of them; the dreams start from these
    rounds: int = 10  # rounds of data, M, C and truth
    first_rollouts: int = 100  # laps of --first-driver
    rollouts: int = 50  # laps of each round's C added for the next round
    noise: float = 0.1  # std of the Gaussian noise on the laps' actions (lucid-dream-racer: 0.1)
    seed: int = COLLECT_SEED + 800  # the first laps drive tracks seed, seed + 1, ..., each round's the next ones
    m_epochs: int = 10  # M's passes over the laps each round
    m_lr: float = 3e-4  # M's fine-tuning learning rate (its first training: 1e-3)
    mixture: str = ""  # M's mixture each round: dim (the paper's) or frame (models/mdnrnn.py); empty: --mdnrnn's
    head_only: bool = False  # each round trains only M's mixture head; the LSTM and reward and done heads stay --mdnrnn's
    generations: int = 20  # CMA-ES generations in each round's dream
    pop_size: int = 32  # CMA-ES population
    rollouts_per_member: int = 16  # dreams per member and generation
    dream_start: int = 20  # dreams start at this agent step of a lap or later (every 10th), M's memory warmed up
    dream_frames: int = 200  # a dream's length in frames, short enough for M to stay near the real game
    temperature: float = 1.0  # tau of M's sampling in the dream
    eval_every: int = 5  # score the CMA-ES mean on the held-out tracks every this many generations
    eval_episodes: int = 24  # held-out tracks
    truth_episodes: int = 4  # tracks per controller of the truth's ladder
    truth_scales: str = "0,0.25,0.5,0.75,1"  # the truth's ladder: the round's C times these
    replays: int = 0  # real states each round's C dreams from and replays its dreamed actions in the game (0: laps only)
    carry_c: bool = False  # each round's CMA-ES starts from the last round's C (trained in the last M's dream) instead of zeros
    max_steps: int = 1000  # time limit of a real episode in frames: laps, held-out scores, the truth's episodes
    workers: int = os.cpu_count() or 1  # processes for the laps and the held-out scores
    compare: str = ""  # label=folder pairs, comma-separated: instead of running, plot those loops' rounds side by side
    png: str = ""  # --compare: the plot's file (default loop_comparison.png)

    RANGES = {"rounds": AT_LEAST_1, "first_rollouts": AT_LEAST_1, "rollouts": AT_LEAST_1, "noise": NON_NEGATIVE,
              "seed": NON_NEGATIVE, "m_epochs": AT_LEAST_1, "m_lr": POSITIVE, "generations": AT_LEAST_1,
              "pop_size": AT_LEAST_1, "rollouts_per_member": AT_LEAST_1, "dream_start": NON_NEGATIVE,
              "dream_frames": NON_NEGATIVE, "temperature": POSITIVE, "eval_every": AT_LEAST_1,
              "eval_episodes": AT_LEAST_1, "truth_episodes": AT_LEAST_1, "replays": NON_NEGATIVE, "max_steps": AT_LEAST_1,
              "workers": AT_LEAST_1}


def run(script: str, **flags) -> None:
    """A stage script (or -m module) in a child process with these flags;
    its failure, which it has explained on stderr, stops the loop."""
    args = [sys.executable, *(["-m", script] if not script.endswith(".py") else [str(ROOT / script)])]
    for key, value in flags.items():
        args += [flag(key), str(value)]
    print(f"\n$ {' '.join(args[1:])}", flush=True)
    code = subprocess.run(args, cwd=ROOT).returncode
    if code:
        raise fail(f"{script} stopped (exit status {code}); fix what it says and rerun this command, "
                   f"which goes on where it stopped")


def lap_seeds(cfg: Config, r: int) -> range:
    """The tracks of round r's laps: the first driver's, then each round's C's."""
    if r == 1:
        return range(cfg.seed, cfg.seed + cfg.first_rollouts)
    start = cfg.seed + cfg.first_rollouts + (r - 2) * cfg.rollouts
    return range(start, start + cfg.rollouts)


def lap_frames(cfg: Config, seeds: range) -> int:
    """Real frames of those laps."""
    return game_frames(rollout_path(cfg.data_dir, s) for s in seeds)


def one_round(cfg: Config, r: int, folder: Path) -> dict:
    t0 = time.time()
    driver = cfg.first_driver if r == 1 else str(folder.parent / f"round_{r - 1:02d}")
    seeds = lap_seeds(cfg, r)
    m_args = asdict(MDNRNNConfig(**load_checkpoint(cfg.mdnrnn, "mdnrnn")["model_args"]))
    run("collect_rollouts.py", rollouts=len(seeds), seed=seeds.start, policy="controller", ckpt_dir=driver,
        noise=cfg.noise, out_dir=cfg.data_dir, workers=cfg.workers, max_steps=cfg.max_steps,
        action_repeat=m_args["action_repeat"])
    folder.mkdir(parents=True, exist_ok=True)
    link(cfg.vae, folder)
    run("train_mdnrnn.py", data_dir=cfg.data_dir, latent_dir=cfg.latent_dir, ckpt_dir=folder,
        init_from=cfg.mdnrnn, epochs=cfg.m_epochs, lr=cfg.m_lr, hidden_size=m_args["hidden_size"],
        n_gaussians=m_args["n_gaussians"], mixture=cfg.mixture or m_args["mixture"],
        **({"head_only": True} if cfg.head_only else {}))
    carry = {"init_from": Path(driver) / "controller.pt", "init_from_any_m": True} if cfg.carry_c and r > 1 else {}
    run("train_controller.py", mode="dream", ckpt_dir=folder, latent_dir=cfg.latent_dir, **carry,
        dream_start=cfg.dream_start, dream_frames=cfg.dream_frames, temperature=cfg.temperature,
        pop_size=cfg.pop_size, rollouts_per_member=cfg.rollouts_per_member, generations=cfg.generations,
        eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes, workers=cfg.workers,
        max_steps=cfg.max_steps)
    truth_json = folder / "dream_truth.json"
    if not truth_json.is_file():
        run("tools.dream_truth", ckpt_dir=folder, episodes=cfg.truth_episodes, scales=cfg.truth_scales,
            start_step=cfg.dream_start, dream_frames=cfg.dream_frames, temperature=cfg.temperature,
            max_steps=cfg.max_steps, json=truth_json, png=folder / "dream_truth.png")
    replays_json = folder / "replays.json"
    if cfg.replays and not replays_json.is_file():
        run("experiments.dream_replays", ckpt_dir=folder, data_dir=cfg.data_dir, latent_dir=cfg.latent_dir,
            windows=cfg.replays, dream_start=cfg.dream_start, dream_frames=cfg.dream_frames,
            temperature=cfg.temperature, max_steps=cfg.max_steps, seed=r, json=replays_json)
    replays = json.loads(replays_json.read_text()) if cfg.replays else {"real_frames": 0, "exploit_gap": ""}
    truth = json.loads(truth_json.read_text())
    whole = list(truth["controllers"].values())[-1]  # the last rung: C itself (scale 1)
    c = load_checkpoint(folder / "controller.pt", "controller")
    c_rows = MetricsLog(folder / "controller_metrics.csv", step_key="generation").rows()
    m = load_checkpoint(folder / "mdnrnn.pt", "mdnrnn")
    frames = {"lap_frames": lap_frames(cfg, seeds), "held_out_frames": int(float(c_rows[-1]["frames"])),
              "truth_frames": int(truth["real_frames"]), "replay_frames": int(replays["real_frames"])}
    return {"round": r, "rollouts": len(m["train_rollouts"]) + len(m["val_rollouts"]), "m_val_loss": m["val_loss"],
            "held_out": c["held_out"], "best_generation": c["generation"],
            "dreamed_at_best": dreamed_at(c_rows, c["generation"]),
            "rank_correlation": truth["rank_correlation"], "exploit_gap": whole["exploit_gap"],
            "faithful_steps": whole["faithful_steps"], "replay_gap": replays["exploit_gap"], **frames,
            "seconds": round(time.time() - t0, 1)}


def dreamed_at(rows: list[dict], generation: int) -> float:
    """The population's mean dreamed return at that generation."""
    return next(float(r["mean"]) for r in rows if int(r["generation"]) == generation)


def plot(loops: dict[str, list[dict]], png: str | os.PathLike) -> None:
    """The rounds of one loop or more (label -> its metrics rows), side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = ((("held_out", "dreamed_at_best"), "real held-out score of the round's C (o), dreamed (x)"),
              (("rank_correlation",), "rank correlation, dreamed vs real"),
              (("exploit_gap", "replay_gap"), "exploit gap: truth's C (o), replays (x)"))
    for ax, (keys, title) in zip(axes, panels):
        for n, (label, rows) in enumerate(loops.items()):
            for key, marker in zip(keys, "ox"):
                points = [(int(r["round"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
                if points:
                    ax.plot(*zip(*points), marker=marker, color=f"C{n}", ls="-" if marker == "o" else ":",
                            label=label if marker == "o" else None)
        ax.set(xlabel="round", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


def compare(spec: str, png: str) -> dict[str, list[dict]]:
    """--compare label=out-dir,...: those loops' rounds in one plot, and a table."""
    loops = {}
    for item in spec.split(","):
        label, _, folder = item.partition("=")
        path = Path(folder) / "loop_metrics.csv"
        if not label or not path.is_file():
            raise fail(f"--compare takes label=folder pairs of folders where this loop ran, got {item!r}")
        loops[label] = MetricsLog(path, step_key="round").rows()
    keys = ("held_out", "dreamed_at_best", "rank_correlation", "exploit_gap", "replay_gap", "real_frames")
    print(f"{'loop':>12} {'round':>5}" + "".join(f"{k:>17}" for k in keys))
    for label, rows in loops.items():
        for r in rows:
            print(f"{label:>12} {r['round']:>5}" + "".join(f"{float(r[k]):>17.2f}" if r.get(k) else f"{'':>17}"
                                                       for k in keys))
    plot(loops, png or "loop_comparison.png")
    return loops


def main(cfg: Config) -> list[dict] | dict[str, list[dict]]:
    return compare(cfg.compare, cfg.png) if cfg.compare else run_loop(cfg)


@locked("out_dir", "--out-dir")  # one loop at a time writes there
def run_loop(cfg: Config) -> list[dict]:
    if cfg.mixture not in ("", *MIXTURES):
        raise fail(f"--mixture must be one of {', '.join(MIXTURES)} (or empty: --mdnrnn's), got {cfg.mixture!r}")
    for path, what in ((cfg.vae, "--vae"), (cfg.mdnrnn, "--mdnrnn"),
                       (Path(cfg.first_driver) / "controller.pt", "--first-driver")):
        if not Path(path).is_file():
            raise fail(f"{what}: {path} is not there; give an existing file (or folder, for --first-driver)")
    out = writable_folder(cfg.out_dir, "--out-dir")
    log = MetricsLog(out / "loop_metrics.csv", step_key="round")
    rows = log.rows()
    done = len(rows)
    if done >= cfg.rounds:
        print(f"already {done} rounds in {out}; raise --rounds to go on")
    for r in range(done + 1, cfg.rounds + 1):
        row = one_round(cfg, r, out / f"round_{r:02d}")
        row["real_frames"] = int(float(rows[-1]["real_frames"]) if rows else 0) + sum(
            row[k] for k in FRAMES)
        log.append(row)
        rows = log.rows()
        plot({out.name: rows}, out / "loop.png")
        print(f"round {r}  held-out {row['held_out']:.1f} (generation {row['best_generation']})  "
              f"rank correlation {row['rank_correlation']:.2f}  gap {row['exploit_gap']:.1f}  "
              f"faithful {row['faithful_steps']:.1f} steps  real frames {row['real_frames']:,}  "
              f"{row['seconds']:.0f} s", flush=True)
    best = max(rows, key=lambda row: float(row["held_out"])) if rows else None
    if best:
        folder = out / f"round_{int(best['round']):02d}"
        print(f"best: round {best['round']} ({folder}), held-out {float(best['held_out']):.1f}")
    return rows


if __name__ == "__main__":
    run_main(main, Config)
