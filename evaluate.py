"""Stage 5: score the agent on gymnasium's own CarRacing-v3, and watch it drive.

Each episode drives a new track (seed, seed + 1, ...) until the car finishes
the lap or the time limit; the score is the episode's total reward. The
paper reports the mean and standard deviation over 100 episodes (906 +- 21
for V, M and C; "solved" is 900).

Tracks 0-9,999 are evaluation's own (wm/env.py): the rollouts that V and M
learn from are collected on others. A one-line warning says when some of
the tracks scored are tracks that V or M trained on, as vae.pt and
mdnrnn.pt record them.

--video records the first episode headlessly: each frame shows the real frame,
V's reconstruction of it and M's prediction of it from the step before, with
the running score, so a person sees at once what the agent sees.

The agent holds each action for the frames that controller.pt records (its
action repeat; 1 for files from before it, and for the random baseline).
--policy ppo scores a PPO baseline instead: --ckpt-dir is one of experiments/train_ppo.py's
run folders, which records the arm, its V and M, and the frame skip.

--drive-stats also says how each episode was driven: how often the steering
changes sign from one decision to the next (a bang-bang driver's flips), mean
|steer|, gas and brake, and the top speed (wm.env.DrivingLog).

--backend ray scores the episodes on the actors of a Ray cluster
(docs/scaling.md), with the same scores.

usage: python evaluate.py --ckpt-dir checkpoints --episodes 100 --json scores.json --video drive.mp4
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.controller import Controller, ControllerConfig
from wm.agent import (AgentSpec, EpisodeRunner, build_agent, check_trained_with, load_models, map_episodes,
                      run_episode, run_episodes)
from wm.checkpoint import describe_controller, load_checkpoint, recorded_tracks
from wm.cli import AT_LEAST_1, NON_NEGATIVE, fail, resolve_device, run_main, UsageError
from wm.env import EVAL_SEED, DrivingLog, make_env
from wm.files import writable_file, write_atomically
from wm.frames import to_image
from wm.metrics import interquartile_mean
from wm.pool import WorkerError, check_backend, make_pool


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"  # folder of controller.pt, vae.pt and mdnrnn.pt, or an experiments/train_ppo.py run folder
    policy: str = "agent"  # agent (V, M and C), random (the baseline, needs no checkpoints) or ppo (a PPO baseline)
    episodes: int = 100  # episodes, one track each (the paper: 100)
    seed: int = EVAL_SEED  # episode i drives the track of seed + i; 0-9,999 are evaluation's own tracks (wm/env.py)
    workers: int = os.cpu_count() or 1  # worker processes (Ray actors with --backend ray); 1 runs everything in this process (local backend)
    batch_size: int = 16  # episodes driven at once in lockstep, V, M and C batched (1 with --render human)
    max_steps: int = 1000  # time limit of an episode, in frames (CarRacing-v3's own: 1000)
    render: str = "none"  # none, or human: a window to watch the agent drive (runs in this process)
    video: str = None  # record the first episode to this .gif or .mp4
    json: str = None  # write the scores here: scores, mean, std, episodes, seed
    stochastic: bool = False  # --policy ppo: score the policy's sampled actions, gSDE's noise as in training (the zoo's --stochastic), not its mean action
    drive_stats: bool = False  # also measure how the car is driven (steering sign flips, |steer|, gas, brake, top speed), per episode and in the JSON; runs in this process
    device: str = "auto"  # auto, cpu or cuda, for the episodes run in this process
    backend: str = "local"  # where the workers run: local = processes here, ray = actors on a Ray cluster
    ray_address: str = ""  # --backend ray: empty joins the Ray running here or starts one, auto joins a running cluster, or HOST:PORT

    # The range of each number option, checked in one line before main runs.
    RANGES = {"episodes": AT_LEAST_1, "seed": NON_NEGATIVE, "workers": AT_LEAST_1, "batch_size": AT_LEAST_1,
              "max_steps": AT_LEAST_1}


def in_process_flag(cfg: Config) -> str | None:
    """The flag that makes every episode run in this process, if one does: the window, or the
    driving log, lives in this process's environment."""
    return "--render human" if cfg.render == "human" else "--drive-stats" if cfg.drive_stats else None


def check_config(cfg: Config) -> None:
    if cfg.policy not in ("agent", "random", "ppo"):
        raise fail(f"--policy must be agent, random or ppo, got {cfg.policy!r}")
    if cfg.render not in ("none", "human"):
        raise fail(f"--render must be none or human, got {cfg.render!r}")
    if cfg.stochastic and cfg.policy != "ppo":
        raise fail("--stochastic samples a PPO policy's actions; add --policy ppo, or drop it")
    if cfg.video and Path(cfg.video).suffix.lower() not in (".gif", ".mp4"):
        raise fail(f"--video must end in .gif or .mp4, got {cfg.video}")
    forcing = in_process_flag(cfg)
    if forcing and cfg.backend == "ray":
        raise fail(f"{forcing} runs the episodes in this process; drop --backend ray")
    check_backend(cfg.backend, cfg.ray_address)


def agent_spec(cfg: Config) -> tuple[AgentSpec, np.ndarray | None]:
    """The agent to score and C's weights, after checking that C, V and M belong together."""
    spec = AgentSpec(fast=False, max_steps=cfg.max_steps)  # the official environment
    if cfg.policy == "random":
        return spec, None
    if cfg.policy == "ppo":  # the run records its arm, V and M, and the frames each action is held
        from wm.ppo import PPOAgent, read_run

        run = read_run(cfg.ckpt_dir)
        spec.ckpt_dir, spec.action_repeat = str(cfg.ckpt_dir), run["frame_skip"]
        spec.load = functools.partial(PPOAgent.load, str(cfg.ckpt_dir), stochastic=cfg.stochastic)
        build_agent(spec)  # a run trained on another V or M is refused here, before any worker starts
        print(f"PPO on {run['arm']}, seed {run['seed']}, {run['frames_trained']:,} frames of training, "
              f"each action held {run['frame_skip']} frames, "
              + ("its sampled actions (--stochastic)" if cfg.stochastic else "its mean action"))
        return spec, None
    path = Path(cfg.ckpt_dir) / "controller.pt"
    ckpt = load_checkpoint(path, kind="controller")
    controller = Controller.from_checkpoint(ckpt)
    _, _, fingerprints = load_models(cfg.ckpt_dir, controller.uses_memory)
    check_trained_with(ckpt, path, fingerprints)
    spec.action_repeat = ckpt["action_repeat"]  # the frames each action was held in training
    held = f", each action held {spec.action_repeat} frames" if spec.action_repeat != 1 else ""
    print(f"C: {controller.cfg.features}, {controller.n_params} parameters, {describe_controller(ckpt)}{held}")
    spec.ckpt_dir, spec.controller = str(cfg.ckpt_dir), ckpt["model_args"]
    return spec, controller.get_flat()


class VideoRecorder:
    """Frames of one episode: the game's frame at its own size (600 × 400),
    then V's reconstruction and M's prediction of what V sees (64 × 64,
    scaled up to the same height), and the step and the score under them.

    It sees the frames the agent sees, one every `action_repeat` game frames,
    and keeps one in `every` of them; the video plays at the game's speed.
    The game's frame is `env.render()` of an env made with render_mode
    "rgb_array"; another env's gives the agent's own frame, scaled up."""

    WIDTH, HEIGHT = 600, 400  # CarRacing's window
    BAND = 16  # pixels of text under the panels; 400 + 16 is a multiple of 16, as video codecs like

    def __init__(self, path: str | Path, every: int = 1, action_repeat: int = 1, env=None):
        self.path, self.every, self.frames, self.step = Path(path), every, [], 0
        self.action_repeat, self.env = action_repeat, env

    def __call__(self, frame: np.ndarray, agent, score: float) -> None:
        self.step += 1
        if (self.step - 1) % self.every:
            return
        from PIL import Image, ImageDraw

        W, H = self.WIDTH, self.HEIGHT
        canvas = Image.new("RGB", (W + 2 * H, H + self.BAND))
        game = self.env.render() if self.env is not None and self.env.render_mode == "rgb_array" else None
        if game is None:
            game = np.asarray(Image.fromarray(frame).resize((W, H), Image.BILINEAR))
        canvas.paste(Image.fromarray(game), (0, 0))
        vae = getattr(agent, "vae", None)
        if vae is not None:
            with torch.inference_mode():
                canvas.paste(self._picture(vae.decode(agent.z)), (W, 0))
                if agent.predicted is not None:
                    z_pred = agent.mdnrnn.sample_next_z(agent.predicted, temperature=0)  # (1, Z)
                    canvas.paste(self._picture(vae.decode(z_pred)), (W + H, 0))
        draw = ImageDraw.Draw(canvas)
        for x, label in ((0, "the game"), (W, "V"), (W + H, "M")):
            draw.text((x + 4, 3), label, fill="white")
        draw.text((4, H + 2), f"step {(self.step - 1) * self.action_repeat}   score {score:7.1f}", fill="white")
        self.frames.append(np.asarray(canvas))

    def _picture(self, x: torch.Tensor):
        from PIL import Image

        return Image.fromarray(to_image(x)[0]).resize((self.HEIGHT, self.HEIGHT), Image.NEAREST)

    def save(self) -> None:
        import imageio.v3 as iio
        from PIL import Image

        frames = self.every * self.action_repeat  # game frames per video frame
        if self.path.suffix.lower() == ".gif":
            # CarRacing runs at 50 frames/s; main keeps a GIF to 12.5 pictures a second or fewer,
            # in one palette of 64 colours without dithering: a lap in about 3 MB, not 13.
            sample = Image.fromarray(np.concatenate(self.frames[::max(1, len(self.frames) // 20)]))
            palette = sample.quantize(64, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            pictures = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE)
                        for f in self.frames]
            write_atomically(self.path, lambda tmp: pictures[0].save(
                tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=1000 * frames / 50,
                loop=0))
        else:
            write_atomically(self.path, lambda tmp: iio.imwrite(
                tmp, np.stack(self.frames), fps=50 / frames, macro_block_size=8))  # 1400 x 416


def world_model_tracks(cfg: Config, spec: AgentSpec) -> dict[str, set]:
    """{"V": tracks, "M": tracks} that the V and M the scored policy reads
    were trained on, as far as their checkpoints record them (by file name,
    which holds the track's seed); empty for a policy that reads neither."""
    if cfg.policy == "random":
        return {}
    if cfg.policy == "ppo":
        from wm.ppo import read_run

        run = read_run(cfg.ckpt_dir)
        if run["arm"] == "pixels":
            return {}
        folder, with_m = Path(run["ckpt_dir"]), run["arm"] == "zh"
    else:
        folder, with_m = Path(cfg.ckpt_dir), Controller(ControllerConfig(**spec.controller)).uses_memory
    names = ["vae", "mdnrnn"] if with_m else ["vae"]
    tracks = {name: recorded_tracks(load_checkpoint(folder / f"{name}.pt", kind=name), "train_rollouts")
              for name in names}
    return {{"vae": "V", "mdnrnn": "M"}[name]: t for name, t in tracks.items() if t}


def warn_on_seen_tracks(seeds: list[int], trained_on: dict[str, set]) -> None:
    """One line on stderr when some of the tracks to score are tracks that V
    or M trained on (`world_model_tracks`): that score is not on unseen tracks."""
    seen = set().union(*trained_on.values())
    scored = sorted(seen.intersection(seeds))
    if not scored:
        return
    unseen = seeds[0]  # the first --seed from here whose episodes meet none of them
    while hits := seen.intersection(range(unseen, unseen + len(seeds))):
        unseen = max(hits) + 1
    who = " and ".join(name for name, tracks in trained_on.items() if tracks.intersection(seeds))
    print(f"warning: {len(scored)} of the {len(seeds)} tracks scored (seeds {seeds[0]}..{seeds[-1]}) are "
          f"tracks that {who} trained on (e.g. seed {scored[0]}), so this is no score on unseen tracks; "
          f"--seed {unseen} scores on none of them", file=sys.stderr)


def main(cfg: Config) -> dict:
    check_config(cfg)
    spec, params = agent_spec(cfg)
    for path, name in ((cfg.json, "--json"), (cfg.video, "--video")):
        if path:
            writable_file(path, name)  # now, not after the last episode
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    warn_on_seen_tracks(seeds, world_model_tracks(cfg, spec))
    results: dict[int, tuple[float, int]] = {}
    driving: dict[int, dict] = {}  # --drive-stats
    t0 = time.time()

    def report(i: int, result: tuple[float, int], env=None) -> None:
        results[i] = result
        line = f"episode {i + 1:3d}  seed {seeds[i]}  score {result[0]:7.1f}  steps {result[1]}"
        if cfg.drive_stats:
            driving[i] = env.summary(spec.action_repeat)
            line += "  " + DrivingLog.describe(driving[i])
        print(line, flush=True)

    forcing = in_process_flag(cfg)
    in_process = (cfg.workers == 1 and cfg.backend == "local") or forcing is not None
    if forcing and cfg.workers > 1:
        print(f"{forcing}: every episode runs in this process, not on {cfg.workers} workers")
    if in_process or cfg.video:
        # This process drives all episodes (or just the filmed one) itself.
        agent = build_agent(spec, resolve_device(cfg.device))
        if params is not None:
            agent.controller.set_flat(params)
        new_env = (lambda **kw: DrivingLog(make_env(**kw))) if cfg.drive_stats else make_env
        envs = [new_env(fast=False, render_mode="human" if cfg.render == "human" else None,
                        max_steps=cfg.max_steps)]
        if cfg.video:  # the filmed episode alone
            # Every frame the agent sees, but at most 25 a second in a GIF.
            every = -(-4 // spec.action_repeat) if cfg.video.lower().endswith(".gif") else 1
            film = envs[0] if cfg.render == "human" else new_env(fast=False, render_mode="rgb_array",
                                                                  max_steps=cfg.max_steps)
            video = VideoRecorder(cfg.video, every, spec.action_repeat, film)
            report(0, run_episode(film, agent, seeds[0], on_step=video, action_repeat=spec.action_repeat), film)
            if film is not envs[0]:
                film.close()
            video.save()
            print(f"video of episode 1 saved to {cfg.video}")
        if in_process:
            batch = 1 if cfg.render == "human" else cfg.batch_size  # one window, one car
            envs += [new_env(fast=False, max_steps=cfg.max_steps) for _ in range(min(batch, len(seeds)) - 1)]
            todo = [i for i in range(len(seeds)) if i not in results]
            for start in range(0, len(todo), batch):
                rows = todo[start:start + batch]
                for i, env, result in zip(rows, envs, run_episodes(envs, agent, [seeds[i] for i in rows],
                                                                   action_repeat=spec.action_repeat)):
                    report(i, result, env)
        for env in envs:
            env.close()
    todo = [i for i in range(len(seeds)) if i not in results]
    if todo:
        try:
            with make_pool(cfg.backend, min(cfg.workers, len(todo)), EpisodeRunner, spec,
                           ray_address=cfg.ray_address) as pool:
                map_episodes(pool, [(params, seeds[i]) for i in todo], cfg.batch_size,
                             on_result=lambda k, r: report(todo[k], r))
        except WorkerError as e:
            raise fail(str(e)) from None

    scores = [results[i][0] for i in range(len(seeds))]
    iqm, (low, high) = interquartile_mean(scores)
    summary = {"scores": scores, "mean": float(np.mean(scores)), "std": float(np.std(scores)),
               "iqm": iqm, "iqm_ci95": [low, high],
               "episodes": len(scores), "seed": cfg.seed, "policy": cfg.policy, "stochastic": cfg.stochastic,
               "steps": sum(results[i][1] for i in range(len(seeds))), "seconds": time.time() - t0,
               "frames": [results[i][1] for i in range(len(seeds))]}
    # An episode that ends before the time limit finished its lap (or left the playfield, at -100).
    laps = [f for f in summary["frames"] if f < cfg.max_steps]
    summary["laps_finished"], summary["lap_frames"] = len(laps), float(np.mean(laps)) if laps else None
    if cfg.drive_stats:
        summary["driving"] = [driving[i] for i in range(len(seeds))]
        print("driving, mean over the episodes: " + DrivingLog.describe(
            {key: np.mean([d[key] for d in summary["driving"]]) for key in driving[0]}))
    print(f"{cfg.policy}: {summary['mean']:.1f} +- {summary['std']:.1f}, IQM {iqm:.1f} [{low:.1f}, {high:.1f}] "
          f"over {len(scores)} episodes on CarRacing-v3 (seeds {seeds[0]}..{seeds[-1]})")
    if laps:
        print(f"{len(laps)} of {len(scores)} episodes ended before the time limit of {cfg.max_steps} frames, "
              f"in {summary['lap_frames']:.0f} frames on average")
    if cfg.json:
        try:
            write_atomically(cfg.json, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
        except UsageError as e:  # a full disk: the episodes are not run again for it
            print(json.dumps(summary))
            raise fail(f"{e.message}; the scores are the line of JSON above") from None
    return summary


if __name__ == "__main__":
    run_main(main, Config)
