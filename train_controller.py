"""Stage 4: evolve C with CMA-ES on the real CarRacing-v3, V and M frozen.

Each generation CMA-ES proposes `--pop-size` weight vectors for C; every one
drives the same `--rollouts-per-member` tracks (new tracks each generation)
in a pool of worker processes, and its fitness is its mean reward (--race:
only the better half on the first half of the tracks drives the rest). A worker
drives up to `--batch-size` episodes at once in lockstep (one member's
rollouts, or several members'), so that V, M and C run on a batch. Every
`--eval-every` generations, and after the last, the CMA-ES mean is scored on
a fixed set of held-out tracks; controller.pt keeps the best of those. A
resume with another --eval-episodes first scores controller.pt on the new set.

Reads vae.pt (and mdnrnn.pt for `--features zh`) from --ckpt-dir and writes
there: controller.pt (best by held-out score), controller_es.npz (the CMA-ES
state in plain arrays, wm/search.py, rewritten every generation; a rerun
resumes from it, exactly where it stopped, --restart starts over,
--reset-sigma resumes it with a wider step size, another --pop-size goes on
from its mean and step size with a fresh covariance; --init-from starts a
fresh search at another controller.pt's weights, such as a C trained in M's
dream, instead of zeros),
controller_metrics.csv and controller_reward.png.

--backend ray runs the workers as actors on a Ray cluster instead
(docs/scaling.md); the same seeds give the same fitness on either.

--mode dream scores the members inside M instead (wm/dream.py): the whole
population dreams at once, from the first frames of the rollouts in
--latent-dir (or, with --dream-start, from later steps of them, M's memory
warmed up on the real steps before; --dream-frames long), at temperature
--temperature; the held-out score stays real,
so the curve shows how the dreamed policy transfers. It needs an M with
reward and done heads, and also writes controller_dream_strip.png with each
new controller.pt: that C in the real game beside its dream from the same
first frame.

C holds each action for k frames, k being M's (mdnrnn.pt) when C reads M's
memory or dreams in M, since M learned every k-th frame, else
--action-repeat. controller.pt records k, and evaluate.py drives with it.

usage: python train_controller.py --ckpt-dir checkpoints --pop-size 64 --rollouts-per-member 16 --workers 16
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.controller import FEATURES, Controller, ControllerConfig
from wm.agent import AgentSpec, EpisodeRunner, check_trained_with, load_models, map_episodes
from wm.checkpoint import describe_controller, keep_finished, load_checkpoint, save_checkpoint
from wm.cli import AT_LEAST_1, AT_LEAST_2, NON_NEGATIVE, POSITIVE, fail, resolve_device, run_main
from wm.dream import DreamEnsemble, make_dream, save_dream_strip
from wm.env import HELD_OUT_SEED, SEED_LIMIT, TRAIN_SEED  # the track-seed ranges
from wm.files import locked, writable_folder
from wm.metrics import MetricsLog
from wm.pool import Pool, WorkerError, check_backend, make_pool
from wm.search import BadState, Search


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"  # reads vae.pt and mdnrnn.pt, writes controller.pt and the rest here
    features: str = "zh"  # C's input: zh = [z, h] (the paper), z = V alone, z-hidden = z through 40 tanh units
    pop_size: int = 32  # CMA-ES population (the paper: 64); another one on a resume goes on from the mean and step size
    rollouts_per_member: int = 4  # episodes per member; fitness is their mean (the paper: 16)
    sigma0: float = 0.1  # CMA-ES initial step size (the paper: 0.1)
    reset_sigma: float = 0.0  # on a resume, set CMA-ES's step size to this once, mean and covariance kept (0: keep it); widens a search that has narrowed too early
    generations: int = 300  # total generations, counting those already done before a resume
    workers: int = os.cpu_count() or 1  # worker processes (Ray actors with --backend ray), each with its own environments
    batch_size: int = 16  # episodes a worker drives at once in lockstep, V, M and C batched over them
    max_steps: int = 1000  # time limit of an episode, in frames (the paper: 1000)
    action_repeat: int = 0  # frames each action is held; 0: M's (features zh, or dream mode), else 1 (the paper: 1)
    race: bool = False  # real mode: successive halving; every member drives the first half of the tracks, only the better half drives the rest and ranks above the others (fitness: the mean over the tracks it drove)
    patience: int = 200  # real mode: a training episode ends after this many frames without a positive reward, charged -0.1 a frame left (0: never, the paper; held-out never)
    eval_every: int = 5  # score the CMA-ES mean on held-out tracks every this many generations (the paper: 25)
    eval_episodes: int = 48  # held-out tracks (the paper: 1024)
    seed: int = 0  # seeds CMA-ES and the choice of training tracks
    restart: bool = False  # ignore controller_es.npz and start from scratch (else a rerun resumes)
    init_from: str = ""  # a fresh start's CMA-ES mean: this controller.pt's weights instead of zeros (a warm start, e.g. from a C trained in M's dream)
    init_from_any_m: bool = False  # --init-from may be a C trained with another M of the same size, such as the one this M was fine-tuned beside (experiments/dream_loop.py --carry-c); its weights read h as that M wrote it
    mode: str = "real"  # where members are scored: real = CarRacing-v3 (the paper), dream = inside M
    temperature: float = 1.0  # dream: tau of M's sampling; above 1 C cannot exploit M's flaws (the paper's VizDoom: 1.15)
    latent_dir: str = "data/latents"  # dream: episodes start from the first frames of these rollouts
    dream_start: int = 0  # dream: start at this agent step of those rollouts or later (every 10th), M's memory warmed up on the real steps before it (0: the first frame, memory at zero, as the paper)
    dream_ensemble: str = ""  # dream: more mdnrnn.pt files of M's size, trained with the same vae.pt, comma-separated: each rollout is dreamed in M and in each of them (C reading that M's h) and a member's fitness is the mean, so that exploiting one M's flaw pays less
    dream_gas_cost: float = 0.0  # dream: taken from a member's fitness for each frame of full gas (0.5: 50 for a 200-frame dream at half gas); M dreams more speed than the game's grip allows
    dream_frames: int = 0  # dream: an episode's time limit in frames (0: --max-steps); with --dream-start, a dream that ends while M still tracks the game
    device: str = "auto"  # dream: where the dream runs, auto, cpu or cuda (workers use the CPU)
    bf16: bool = False  # dream: M's matrix products in bfloat16, 2-3x faster on CPUs with bf16 instructions, ~3 digits
    backend: str = "local"  # where the workers run: local = processes here, ray = actors on a Ray cluster
    ray_address: str = ""  # --backend ray: empty joins the Ray running here or starts one, auto joins a running cluster, or HOST:PORT

    # The range of each number option, checked in one line before main runs.
    RANGES = {"pop_size": AT_LEAST_2, "rollouts_per_member": AT_LEAST_1, "sigma0": POSITIVE,
              "reset_sigma": NON_NEGATIVE, "generations": AT_LEAST_1, "workers": AT_LEAST_1,
              "batch_size": AT_LEAST_1, "max_steps": AT_LEAST_1, "patience": NON_NEGATIVE,
              "dream_start": NON_NEGATIVE, "dream_frames": NON_NEGATIVE, "dream_gas_cost": NON_NEGATIVE,
              "eval_every": AT_LEAST_1, "eval_episodes": AT_LEAST_1, "seed": NON_NEGATIVE,
              "temperature": POSITIVE}


def train_seeds(seed: int, generation: int, n: int) -> list[int]:
    """The tracks of one generation, the same for every member, so that members
    are ranked on equal terms; drawn from (seed, generation) so a resumed run
    redoes a generation on the same tracks."""
    rng = np.random.default_rng([seed, generation])
    return rng.integers(TRAIN_SEED, SEED_LIMIT, size=n).tolist()


class RealFitness:
    """Fitness on the environment itself (the fast twin), in the worker pool.

    A fitness source maps a population and its tracks to rewards; another
    source (a dream in M) can take this one's place in `main`.
    """

    def __init__(self, pool: Pool, batch_size: int, patience: int = 0, race: bool = False):
        self.pool, self.batch_size, self.patience, self.race = pool, batch_size, patience, race
        self.survivors: np.ndarray | None = None  # race: the members that drove every track

    def __call__(self, solutions: list[np.ndarray], seeds: list[int]) -> tuple[np.ndarray, int]:
        """-> (mean reward per member (P,) over the tracks it drove, environment steps taken)."""
        if not self.race:
            rewards, steps = self.drive(solutions, seeds, "rollouts")
            return rewards.mean(1), steps
        # Successive halving: the better half on the first tracks drives the rest too.
        half = len(seeds) // 2
        first, steps = self.drive(solutions, seeds[:half], "rollouts, first half")
        self.survivors = np.zeros(len(solutions), dtype=bool)
        self.survivors[np.argsort(-first.mean(1), kind="stable")[:len(solutions) // 2]] = True
        rest, more = self.drive([x for x, s in zip(solutions, self.survivors) if s], seeds[half:],
                                "rollouts, better half")
        rewards = first.mean(1)
        rewards[self.survivors] = np.concatenate([first[self.survivors], rest], axis=1).mean(1)
        return rewards, steps + more

    def drive(self, solutions: list[np.ndarray], seeds: list[int], what: str) -> tuple[np.ndarray, int]:
        """-> (reward per member and track (P, len(seeds)), environment steps taken)."""
        # Member-major, so that a worker's batch is one member's rollouts, or several members'.
        tasks = [(x, s) for x in solutions for s in seeds]
        results = run_in_pool(self.pool, tasks, self.batch_size, what, self.patience)
        rewards = np.array([r for r, _ in results]).reshape(len(solutions), len(seeds))
        return rewards, sum(n for _, n in results)


def race_ranking(rewards: np.ndarray, survivors: np.ndarray) -> np.ndarray:
    """What CMA-ES minimises after a race: the members that drove every track
    first, by their mean over all of them, then the rest by their mean over the
    first half (pycma uses only the order)."""
    order = np.lexsort((-rewards, ~survivors))  # the last key sorts first
    ranks = np.empty(len(rewards))
    ranks[order] = np.arange(len(rewards))
    return ranks


def run_in_pool(pool: Pool, tasks: list[tuple], batch_size: int, what: str,
                patience: int = 0) -> list[tuple[float, int]]:
    with tqdm(total=len(tasks), desc=what, leave=False, unit="ep") as bar:
        return map_episodes(pool, tasks, batch_size, on_result=lambda i, r: bar.update(), patience=patience)


def score_held_out(pool: Pool, x: np.ndarray, seeds: list[int], batch_size: int) -> tuple[list[float], int]:
    """C's flat weights `x` on the held-out tracks: (score per track, frames driven)."""
    held = run_in_pool(pool, [(x, s) for s in seeds], batch_size, "held-out")
    return [r for r, _ in held], sum(n for _, n in held)


def rescore_best(state: dict, controller: Controller, pool: Pool, cfg: Config, path: Path,
                 held_out_seeds: list[int], fingerprints: dict) -> None:
    """A resume with another --eval-episodes scores controller.pt again on the
    new held-out tracks, so that later CMA-ES means are compared with it on the
    same tracks (a state from before this was recorded counts as another).
    controller.pt keeps its weights and takes the new score."""
    ckpt = load_checkpoint(path, "controller")
    check_trained_with(ckpt, path, fingerprints)
    controller.load_state_dict(ckpt["model"])
    scores, frames = score_held_out(pool, controller.get_flat(), held_out_seeds, cfg.batch_size)
    score = float(np.mean(scores))
    print(f"{path.name} (generation {ckpt['generation']}) scored again on {len(held_out_seeds)} held-out "
          f"tracks: {score:.1f} (it had {state['best_held_out']:.1f} on the old ones)")
    state["best_held_out"] = score
    state["frames"] = state.get("frames", 0) + frames
    save_checkpoint(path, {**ckpt, "held_out": score, "held_out_std": float(np.std(scores))})


def check_config(cfg: Config) -> None:
    if cfg.features not in FEATURES:
        raise fail(f"--features must be one of {', '.join(FEATURES)}, got {cfg.features!r}")
    if cfg.action_repeat < 0:
        raise fail(f"--action-repeat must be 0 (M's, or 1 without M) or a number of frames, got {cfg.action_repeat}")
    if cfg.mode not in ("real", "dream"):
        raise fail(f"--mode must be real or dream, got {cfg.mode!r}")
    if cfg.dream_ensemble and cfg.mode != "dream":
        raise fail(f"--dream-ensemble dreams in more Ms: it needs --mode dream, got --mode {cfg.mode}")
    if cfg.race and (cfg.mode != "real" or cfg.rollouts_per_member < 2):
        raise fail(f"--race splits each member's tracks in two on the real game: it needs --mode real and "
                   f"--rollouts-per-member 2 or more, got --mode {cfg.mode} --rollouts-per-member {cfg.rollouts_per_member}")
    check_backend(cfg.backend, cfg.ray_address)


ES_STATE = "controller_es.npz"  # the search's resume state, plain arrays (wm/search.py)


def load_es_state(ckpt_dir: Path, signature: dict) -> tuple[Search, dict] | None:
    """The saved search and its info, or None to start afresh; an error if
    it was made for another C, V, M or action repeat."""
    path = ckpt_dir / ES_STATE
    if not path.is_file():
        return None
    try:
        search, info = Search.load(path)
    except BadState as e:
        raise fail(f"{e}; pass --restart to start over")
    if not isinstance(info.get("signature"), dict) or "generation" not in info:
        raise fail(f"{path} is not a CMA-ES state of train_controller.py; pass --restart to start over")
    # A real-mode run leaves "mode" out of its signature, a run in one M "dream_ensemble".
    absent = {"mode": "real", "dream_ensemble": []}
    made, this = {**absent, **info["signature"]}, {**absent, **signature}
    if made["mode"] != this["mode"]:
        raise fail(f"{path} is from a {made['mode']}-mode run and this one is {this['mode']}-mode; pass "
                   f"--mode {made['mode']} to resume it, or --restart to start over")
    for key, value in this.items():
        if made.get(key) != value:
            raise fail(f"{path} was made with {key} = {made.get(key)}, this run has "
                       f"{value}; pass --restart to start over, or match its settings")
    return search, info


def warm_start(path: str, controller: Controller, fingerprints: dict, action_repeat: int,
               any_m: bool = False) -> np.ndarray:
    """C's flat weights from the controller.pt at `path`, for a search to
    start from; it must be a C of this shape, trained with this V, M (any
    M of this size when `any_m`) and k."""
    if not Path(path).is_file():
        raise fail(f"--init-from {path}: no such file; give the controller.pt to start from")
    ckpt = load_checkpoint(path, "controller")
    if ckpt["model_args"] != asdict(controller.cfg):
        raise fail(f"--init-from {path} is a C with {ckpt['model_args']}, this run's has "
                   f"{asdict(controller.cfg)}; give a controller.pt trained with the same --features")
    if any_m:  # the shape check above is what a C needs of M's h
        fingerprints = {**fingerprints, "mdnrnn_fingerprint": ckpt.get("mdnrnn_fingerprint")}
    check_trained_with(ckpt, path, fingerprints)
    if ckpt["action_repeat"] != action_repeat:
        raise fail(f"--init-from {path} holds each action {ckpt['action_repeat']} frames, this run "
                   f"{action_repeat}; give a controller.pt trained with this mdnrnn.pt")
    controller.load_state_dict(ckpt["model"])
    print(f"warm start from {path} ({describe_controller(ckpt)})")
    return controller.get_flat()


def pick_action_repeat(flag: int, mdnrnn) -> int:
    """C acts at M's rate when it reads M's memory or dreams in M (M learned
    every k-th frame), else at --action-repeat (0: 1); a flag that
    contradicts M is refused."""
    if mdnrnn is None:
        return flag or 1
    k = mdnrnn.cfg.action_repeat
    if flag not in (0, k):
        raise fail(f"--action-repeat {flag} does not match mdnrnn.pt, which learned every {k} frames "
                   f"(its rollouts were collected with --action-repeat {k}), and C acts at M's rate; "
                   f"leave --action-repeat out, or train M on rollouts collected with --action-repeat {flag}")
    return k


def start_or_resume(cfg: Config, ckpt_dir: Path, controller: Controller, signature: dict,
                    fingerprints: dict, action_repeat: int) -> tuple[Search, dict]:
    """The search and its state: resumed from controller_es.npz, else started
    afresh (from zero weights, the paper's start: steer straight, half gas; or
    from --init-from); then widened once by --reset-sigma and resized to
    --pop-size, if they ask for it."""
    loaded = load_es_state(ckpt_dir, signature) if not cfg.restart else None
    if loaded is None:
        keep_finished(ckpt_dir / "controller.pt", ckpt_dir / ES_STATE, cfg.restart)
        x0 = (warm_start(cfg.init_from, controller, fingerprints, action_repeat, cfg.init_from_any_m) if cfg.init_from
              else np.zeros(controller.n_params))
        search = Search.start(x0, cfg.sigma0, cfg.pop_size, cfg.seed + 1)  # cma reads seed 0 as "time"
        state = {"generation": 0, "best_held_out": -np.inf, "signature": signature}
    else:
        search, state = loaded
        warm = " (--init-from applies to a fresh start only)" if cfg.init_from else ""
        print(f"resuming from {ckpt_dir / ES_STATE} at generation {state['generation']}{warm}")
    # Once per value, so that rerunning the same command after an interruption
    # resumes the widened search instead of widening it again.
    if cfg.reset_sigma and state["generation"] and state.get("reset_sigma") != cfg.reset_sigma:
        print(f"step size {search.es.sigma:.4f} -> {cfg.reset_sigma} (--reset-sigma)")
        search.set_sigma(cfg.reset_sigma)
        state["reset_sigma"] = cfg.reset_sigma
    if state["generation"] and search.es.popsize != cfg.pop_size:
        print(f"population {search.es.popsize} -> {cfg.pop_size}: CMA-ES goes on from its mean at step size "
              f"{search.es.sigma:.4f}, its covariance reset")
        search.resize(cfg.pop_size, cfg.seed + 1 + state["generation"])
    return search, state


def keep_if_best(state: dict, x: np.ndarray, scores: list[float], generation: int, controller: Controller,
                 path: Path, record: dict) -> bool:
    """Save the weights `x` as controller.pt when their held-out score beats
    the best so far; `record` is what the checkpoint says of how C was made."""
    score = float(np.mean(scores))
    if score <= state["best_held_out"]:
        return False
    state["best_held_out"] = score
    controller.set_flat(x)
    save_checkpoint(path, {"kind": "controller", "model": controller.state_dict(), "generation": generation,
                           "held_out": score, "held_out_std": float(np.std(scores)), **record})
    return True


def print_row(row: dict) -> None:
    held = f"  held-out {row['held_out']:7.1f}" if "held_out" in row else ""
    print(f"generation {row['generation']}  mean {row['mean']:7.1f}  best {row['best']:7.1f}  "
          f"worst {row['worst']:7.1f}  sigma {row['sigma']:.4f}{held}  "
          f"{row['steps_per_s']:.0f} steps/s  {row['seconds']:.1f} s", flush=True)


def dream_ensemble(cfg: Config, dream, mdnrnn, controller: Controller) -> tuple:
    """--dream-ensemble's Ms beside M: (the fitness, their fingerprints), or
    (M's dream, []) without it. Each must be of M's size and action repeat
    (C reads its h and holds its actions as M's) and trained with this V."""
    paths = [p.strip() for p in cfg.dream_ensemble.split(",") if p.strip()]
    if not paths:
        return dream, []
    dreams, fingerprints = [dream], []
    for path in paths:
        if not Path(path).is_file():
            raise fail(f"--dream-ensemble {path}: no such file; give mdnrnn.pt files trained with this vae.pt")
        other, world = make_dream(cfg.ckpt_dir, controller, cfg.latent_dir, cfg.temperature, episode_frames(cfg),
                                  resolve_device(cfg.device), cfg.bf16, cfg.dream_start, mdnrnn_path=path,
                                  gas_cost=cfg.dream_gas_cost)
        size = (world.mdnrnn.cfg.hidden_size, world.mdnrnn.cfg.action_repeat)
        if size != (mdnrnn.cfg.hidden_size, mdnrnn.cfg.action_repeat):
            raise fail(f"--dream-ensemble {path} has hidden size {size[0]} and action repeat {size[1]}, "
                       f"mdnrnn.pt {mdnrnn.cfg.hidden_size} and {mdnrnn.cfg.action_repeat}; C reads one M's h, "
                       f"so give Ms of its size")
        dreams.append(other)
        fingerprints.append(world.mdnrnn_fingerprint)
    print(f"dreams in {len(dreams)} Ms: mdnrnn.pt and {', '.join(paths)}; fitness is their mean")
    return DreamEnsemble(dreams), fingerprints


def episode_frames(cfg: Config) -> int:
    """A training episode's time limit in frames: a dream's may be shorter."""
    return (cfg.dream_frames or cfg.max_steps) if cfg.mode == "dream" else cfg.max_steps


@locked("ckpt_dir", "--ckpt-dir")  # one run at a time writes there
def main(cfg: Config) -> dict:
    check_config(cfg)
    ckpt_dir = Path(cfg.ckpt_dir)
    uses_m = cfg.features == "zh"
    vae, mdnrnn, fingerprints = load_models(ckpt_dir, with_m=uses_m)
    ccfg = ControllerConfig(latent_size=vae.cfg.latent_size,
                            hidden_size=mdnrnn.cfg.hidden_size if uses_m else 0,
                            features=cfg.features)
    controller = Controller(ccfg)
    if cfg.mode == "dream":
        dream, world = make_dream(ckpt_dir, controller, cfg.latent_dir, cfg.temperature, episode_frames(cfg),
                                  resolve_device(cfg.device), cfg.bf16, cfg.dream_start,
                                  gas_cost=cfg.dream_gas_cost)
        mdnrnn = world.mdnrnn  # C may not read M itself, but it dreams in M
        dream, ensemble = dream_ensemble(cfg, dream, mdnrnn, controller)
    action_repeat = pick_action_repeat(cfg.action_repeat, mdnrnn)
    del vae, mdnrnn  # the workers load their own copies
    writable_folder(ckpt_dir, "--ckpt-dir")

    es_path = ckpt_dir / ES_STATE
    # What a resume must match; not the population, which Search.resize changes.
    signature = {"features": cfg.features, "n_params": controller.n_params,
                 "action_repeat": action_repeat, **fingerprints}
    if cfg.mode == "dream":
        signature.update(mode="dream", dream_mdnrnn_fingerprint=world.mdnrnn_fingerprint)
        if ensemble:
            signature["dream_ensemble"] = ensemble
    search, state = start_or_resume(cfg, ckpt_dir, controller, signature, fingerprints, action_repeat)
    es = state["es"] = search.es  # for a caller in this process: pycma's mean, sigma and result
    start = state["generation"]
    metrics = MetricsLog(ckpt_dir / "controller_metrics.csv", step_key="generation")
    metrics.truncate_after(start)
    if start >= cfg.generations:
        print(f"already at generation {start}; raise --generations to train further")
        return state

    held = f", each action held {action_repeat} frames" if action_repeat != 1 else ""
    print(f"C: {cfg.features}, {controller.n_params} parameters; population {cfg.pop_size} x "
          f"{cfg.rollouts_per_member} rollouts of up to {episode_frames(cfg)} frames{held}"
          f"{' (racing: the better half drives the second half of them)' if cfg.race else ''}, {cfg.workers} "
          f"{'Ray actors' if cfg.backend == 'ray' else 'workers'}")
    spec = AgentSpec(ckpt_dir=str(ckpt_dir), controller=asdict(ccfg), fast=True,
                     max_steps=cfg.max_steps, action_repeat=action_repeat)
    held_out_seeds = [HELD_OUT_SEED + i for i in range(cfg.eval_episodes)]
    record = {"model_args": asdict(ccfg), "config": asdict(cfg), "action_repeat": action_repeat, **fingerprints}
    try:
        with make_pool(cfg.backend, cfg.workers, EpisodeRunner, spec, ray_address=cfg.ray_address) as pool:
            fitness = dream if cfg.mode == "dream" else RealFitness(pool, cfg.batch_size, cfg.patience, cfg.race)
            if state.get("eval_episodes") != cfg.eval_episodes and np.isfinite(state["best_held_out"]):
                rescore_best(state, controller, pool, cfg, ckpt_dir / "controller.pt", held_out_seeds, fingerprints)
            state["eval_episodes"] = cfg.eval_episodes
            # Saved before the first generation too, so that a run killed after
            # writing its first controller.pt still has a state to resume from.
            search.save(es_path, {k: v for k, v in state.items() if k != "es"})
            for gen in range(start, cfg.generations):
                # Ask, evaluate, tell.
                t0 = time.time()
                solutions = search.ask()
                rewards, steps = fitness(solutions, train_seeds(cfg.seed, gen, cfg.rollouts_per_member))
                if not np.all(np.isfinite(rewards)):  # told to CMA-ES, it would poison the state
                    raise fail(f"generation {gen + 1}: {np.sum(~np.isfinite(rewards))} members' fitness is not "
                               f"finite; {es_path} is left as it was after generation {gen}")
                # cma minimises
                search.tell(solutions, race_ranking(rewards, fitness.survivors) if cfg.race else -rewards)
                row = {"generation": gen + 1, "mean": rewards.mean(), "best": rewards.max(),
                       "worst": rewards.min(), "sigma": es.sigma, "steps_per_s": steps / (time.time() - t0)}
                frames = steps if cfg.mode == "real" else 0  # real frames: a dreamed step costs none

                # Score the distribution's mean on the held-out tracks; keep the best.
                if (gen + 1) % cfg.eval_every == 0 or gen + 1 == cfg.generations:
                    mean_x = es.result.xfavorite
                    scores, held_frames = score_held_out(pool, mean_x, held_out_seeds, cfg.batch_size)
                    frames += held_frames
                    row["held_out"] = float(np.mean(scores))
                    if (keep_if_best(state, mean_x, scores, gen + 1, controller, ckpt_dir / "controller.pt", record)
                            and cfg.mode == "dream"):  # the new C in the real game beside its dream
                        save_dream_strip(world.vae, world.mdnrnn, controller, ckpt_dir / "controller_dream_strip.png",
                                         HELD_OUT_SEED, cfg.temperature, cfg.max_steps)

                # Log. The row first: killed before the state, the resumed run drops
                # it and redoes the generation; the other way round, the row would be lost.
                row["seconds"] = time.time() - t0
                state["frames"] = state.get("frames", 0) + frames  # held-out frames included
                row["frames"] = state["frames"]
                state["generation"] = gen + 1
                metrics.append(row)
                search.save(es_path, {k: v for k, v in state.items() if k != "es"})
                metrics.plot(ckpt_dir / "controller_reward.png", ["mean", "best", "held_out"],
                             title=f"CMA-ES {'in M' if cfg.mode == 'dream' else 'on CarRacing-v3'} "
                                   f"(C: {cfg.features})", ylabel="reward")
                print_row(row)
    except WorkerError as e:
        raise fail(str(e)) from None
    print(f"best held-out score {state['best_held_out']:.1f}; C saved to {ckpt_dir / 'controller.pt'}")
    return state


if __name__ == "__main__":
    run_main(main, Config)
