"""Speed measurements, each as a ratio measured in one run on this machine.

    python -m bench.speed env --steps 300 --json     stock vs fast CarRacing-v3
    python -m bench.speed vae --json                 ConvVAE training images/s
    python -m bench.speed mdnrnn --json              MDN-RNN sequences/s, cell steps/s
    python -m bench.speed agent --json               agent loop steps/s, 1 vs all workers, batched
    python -m bench.speed agent --backend ray --workers 2 --json    the same on Ray's actors, 1 vs 2
    python -m bench.speed repeat --json              agent loop frames/s holding actions 1, 2, 3 frames
    python -m bench.speed dream --json               simulated dream steps/s

Each subcommand prints one JSON object with --json, else one line per number.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import numpy as np  # noqa: E402

from wm.cli import AT_LEAST_1, AT_LEAST_2, NON_NEGATIVE, POSITIVE, UsageError, check_ranges, program_name  # noqa: E402


def bench_env(args) -> dict:
    """Step the stock and the fast environment on the same seed and actions,
    alternating in chunks so both see the same machine load. Only env.step is
    timed: a reset (a new track, when an episode ends) is not a step. Every
    frame of the two is compared."""
    from wm.env import make_env

    rng = np.random.default_rng(args.seed)
    actions = brownian_actions(rng, args.steps)
    envs = {"stock": make_env(fast=False), "fast": make_env(fast=True)}
    times = {"stock": 0.0, "fast": 0.0}
    frames = {name: [] for name in envs}
    episode = {name: 0 for name in envs}
    for name, env in envs.items():
        env.reset(seed=args.seed)
    identical, steps, chunk = True, 0, 50
    for start in range(0, args.steps, chunk):
        for name, env in envs.items():
            frames[name] = []
            for a in actions[start:start + chunk]:
                t0 = time.perf_counter()
                o, r, term, trunc, _ = env.step(a)
                times[name] += time.perf_counter() - t0
                frames[name].append(o)
                if term or trunc:
                    episode[name] += 1
                    frames[name].append(env.reset(seed=args.seed + episode[name])[0])
        identical &= all(np.array_equal(a, b) for a, b in zip(frames["stock"], frames["fast"]))
        identical &= len(frames["stock"]) == len(frames["fast"])
        steps += len(actions[start:start + chunk])
    return {
        "steps": steps,
        "stock_steps_per_s": round(steps / times["stock"], 1),
        "fast_steps_per_s": round(steps / times["fast"], 1),
        "ratio": round(times["stock"] / times["fast"], 2),
        "pixel_identical": bool(identical),
    }


def brownian_actions(rng, steps):
    from wm.policies import BrownianPolicy

    policy = BrownianPolicy(rng)
    return np.stack([policy() for _ in range(steps)])


def bench_mdnrnn(args) -> dict:
    """MDN-RNN training sequences/s and one-step cell steps/s at batch 1 and 1024,
    at the paper's size (Z 32, 256 units, 5 Gaussians), on random inputs."""
    import torch

    from models import MDNRNN, MDNRNNConfig, mdn_loss
    from wm.cli import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = MDNRNN(MDNRNNConfig()).to(device)
    Z, A = model.cfg.latent_size, model.cfg.action_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def rate(fn, units: float) -> float:
        """units per second of fn(), timed for about args.seconds after a warm-up."""
        fn(), fn()
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            fn()
            n += 1
            sync()
        return n * units / (time.perf_counter() - t0)

    B, L = args.batch_size, args.seq_len
    z, a = torch.randn(B, L + 1, Z, device=device), torch.rand(B, L, A, device=device)
    r, d = torch.randn(B, L, device=device), torch.zeros(B, L, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        out, _ = model(z[:, :-1], a)
        loss = mdn_loss(out, z[:, 1:], r, d).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    result = {"device": str(device), "batch_size": B, "seq_len": L,
              "train_seq_per_s": round(rate(train_step, B), 1)}
    model.eval()
    for rows in (1, 1024):
        zs, acts = torch.randn(rows, Z, device=device), torch.rand(rows, A, device=device)
        state = model.initial_state(rows, device)

        @torch.no_grad()
        def cell_step():
            model.step(zs, acts, state)

        result[f"cell_b{rows}_calls_per_s"] = round(rate(cell_step, 1), 1)
        result[f"cell_b{rows}_row_steps_per_s"] = round(result[f"cell_b{rows}_calls_per_s"] * rows, 1)
    result["cell_batch_1024_vs_1_rows"] = round(result["cell_b1024_row_steps_per_s"]
                                                / result["cell_b1_row_steps_per_s"], 1)
    return result


def bench_agent(args) -> dict:
    """Agent loop steps/s (frame -> V -> C -> env, M) on 1 worker and on all, against the env alone.

    V and M are untrained, at the paper's size, unless --ckpt-dir names trained
    ones: the speed does not depend on the weights. C has zero weights (CMA-ES's
    start), so that it steers straight at half gas whatever it sees, and the
    env alone is driven so too (StraightAgent): both render the same frames.
    All three numbers come from the same worker pool code and the fast env,
    each worker driving --batch-size episodes at once (V, M and C batched over
    them, as in train_controller.py), timed after one warm-up batch per
    worker; --rounds rounds of --episodes batches per worker, each episode
    --steps steps (resets included). network_overhead = agent time per step /
    env time per step - 1. --backend ray runs every pool on Ray's actors (see
    time_pools)."""
    import tempfile

    from wm.agent import AgentSpec, EpisodeRunner

    with tempfile.TemporaryDirectory() as tmp:
        agent, params = agent_for_bench(args, tmp)
        n = args.workers
        runs = {"env": (env_alone_runner, AgentSpec(max_steps=args.steps), 1, None),
                "one": (EpisodeRunner, agent, 1, params), "all": (EpisodeRunner, agent, n, params)}
        steps, seconds, cpu = time_pools(runs, args)
    env_sps, one, many = (steps[k] / seconds[k] for k in runs)
    return {
        "env_steps_per_s": round(env_sps, 1),
        "agent_1_worker_steps_per_s": round(one, 1),
        f"agent_{n}_workers_steps_per_s": round(many, 1),
        "network_overhead": round(env_sps / one - 1, 3),
        # The same from the workers' CPU time, which a busy machine's load distorts less.
        "network_overhead_cpu": round((cpu["one"] / steps["one"]) / (cpu["env"] / steps["env"]) - 1, 3),
        "speedup_all_workers": round(many / one, 2),
        "workers": n,
        "batch_size": args.batch_size,
        "backend": args.backend,
    }


def bench_repeat(args) -> dict:
    """Agent loop frames/s holding each action for k frames (--action-repeat 1,2,3), one worker each.

    The agent of `python -m bench.speed agent` (V, M and C, the fast env, --batch-size
    episodes at once, --steps frames an episode), with only every k-th frame
    rendered and seen by the networks. The k alternate in --rounds rounds, so
    that all see the same load; frames_per_s_k* count game frames (steps of
    the environment), and speedup_k* is each rate over the first k's."""
    import tempfile
    from dataclasses import replace

    from wm.agent import EpisodeRunner

    ks = [int(k) for k in args.action_repeat.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        agent, params = agent_for_bench(args, tmp)
        runs = {k: (EpisodeRunner, replace(agent, action_repeat=k), 1, params) for k in ks}
        frames, seconds, cpu = time_pools(runs, args)
    rate = {k: frames[k] / seconds[k] for k in ks}
    return {
        **{f"frames_per_s_k{k}": round(rate[k], 1) for k in ks},
        **{f"speedup_k{k}": round(rate[k] / rate[ks[0]], 2) for k in ks[1:]},
        # The same from the worker's CPU time, which a busy machine's load distorts less.
        **{f"speedup_cpu_k{k}": round((cpu[ks[0]] / frames[ks[0]]) / (cpu[k] / frames[k]), 2) for k in ks[1:]},
        **{f"frames_k{k}": frames[k] for k in ks},  # timed, the same at every k
        "batch_size": args.batch_size,
    }


def agent_for_bench(args, tmp: str):
    """(AgentSpec of V, M and C on the fast env with --steps frames an episode,
    C's flat weights, all zero): the models of --ckpt-dir, or untrained ones
    at the paper's size written to `tmp`."""
    from dataclasses import asdict

    from models import MDNRNN, ConvVAE, MDNRNNConfig, VAEConfig
    from models.controller import Controller, ControllerConfig
    from wm.agent import AgentSpec
    from wm.checkpoint import load_checkpoint, save_checkpoint

    ckpt_dir = args.ckpt_dir or tmp
    if not args.ckpt_dir:
        vcfg, mcfg = VAEConfig(), MDNRNNConfig()
        save_checkpoint(f"{tmp}/vae.pt", {"kind": "vae", "model": ConvVAE(vcfg).state_dict(),
                                          "model_args": asdict(vcfg)})
        save_checkpoint(f"{tmp}/mdnrnn.pt", {
            "kind": "mdnrnn", "model": MDNRNN(mcfg).state_dict(), "model_args": asdict(mcfg),
            "vae_fingerprint": load_checkpoint(f"{tmp}/vae.pt", "vae")["fingerprint"]})
    m_args = load_checkpoint(f"{ckpt_dir}/mdnrnn.pt", "mdnrnn")["model_args"]
    ccfg = ControllerConfig(latent_size=m_args["latent_size"], hidden_size=m_args["hidden_size"])
    spec = AgentSpec(ckpt_dir=ckpt_dir, controller=asdict(ccfg), max_steps=args.steps)
    return spec, np.zeros(Controller(ccfg).n_params)


class StraightAgent:
    """The env alone's driver: what C with zero weights does whatever it sees
    (steer straight, half gas, no brake), without V, M or C."""

    def __init__(self):
        import torch

        from models.controller import squash

        self.action = squash(torch.zeros(3)).numpy()  # C's last layer outputs its bias, 0

    def reset(self, seeds, params=None) -> None:
        pass

    def act(self, frames: np.ndarray) -> np.ndarray:
        return np.tile(self.action, (len(frames), 1))  # (K, 3)

    def keep(self, rows) -> None:
        pass


def env_alone_runner(spec):
    """A pool worker: wm.agent.EpisodeRunner, driving with StraightAgent."""
    from wm.agent import EpisodeRunner

    runner = EpisodeRunner(spec)
    runner.agent = StraightAgent()
    return runner


def time_pools(runs: dict, args) -> tuple[dict, dict, dict]:
    """runs: {name: (worker factory, AgentSpec, workers, C's flat weights or
    None)}. One worker pool per run, on --backend; after one warm-up batch per
    worker, --rounds rounds that alternate the runs, so that all see the same
    machine load, each of --episodes batches of --batch-size episodes per worker. ->
    (environment steps, wall-clock seconds, the workers' CPU seconds) per run.

    On Ray with no --ray-address, the local instance started here counts a
    CPU for every actor of every pool, since each actor holds one: only one
    pool runs at a time, so the machine's cores still serve one pool."""
    from wm.agent import map_episodes
    from wm.pool import check_backend, make_pool

    K = args.batch_size
    pools, ray = {}, None
    check_backend(args.backend, args.ray_address)
    if args.backend == "ray" and not args.ray_address:
        import ray

        ray.init(num_cpus=sum(w for _, _, w, _ in runs.values()), include_dashboard=False)
    try:
        for name, (runner, spec, w, _) in runs.items():
            pools[name] = make_pool(args.backend, w, runner, spec, ray_address=args.ray_address)
        for name, (_, _, w, p) in runs.items():  # warm-up, which also makes each worker's K environments
            map_episodes(pools[name], [(p, args.seed + i) for i in range(w * K)], K)
        steps, seconds, cpu = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
        for r in range(args.rounds):
            for name, (_, _, w, p) in runs.items():
                tasks = [(p, args.seed + 1000 * (r + 1) + i) for i in range(args.episodes * w * K)]
                t0, c0 = time.perf_counter(), pools[name].cpu_seconds()
                steps[name] += sum(n_steps for _, n_steps in map_episodes(pools[name], tasks, K))
                seconds[name] += time.perf_counter() - t0
                cpu[name] += pools[name].cpu_seconds() - c0
    finally:
        for pool in pools.values():
            pool.close()
        if ray is not None:
            ray.shutdown()
    return steps, seconds, cpu


def bench_dream(args) -> dict:
    """Dream steps/s: a population of controllers dreaming in M as one batch,
    at the paper's sizes (Z 32, 256 units, 5 Gaussians, C on [z, h]), in
    float32 and with bfloat16 matrix products, each on one thread and on
    torch's default thread count (on a busy machine one thread can win: the
    others wait on descheduled peers). steps_per_cpu_s_* divide by the CPU
    time this process got on one thread, which a shared machine shrinks less
    than the wall-clock rate: what one core of its own would give."""
    import torch

    from models import MDNRNN, MDNRNNConfig
    from models.controller import Controller, ControllerConfig
    from wm.cli import resolve_device
    from wm.dream import Dream

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    m = MDNRNN(MDNRNNConfig())
    with torch.no_grad():  # an untrained done head ends episodes at random: time the full length
        m.done_head.bias.fill_(-50.0)
    c = Controller(ControllerConfig(latent_size=m.cfg.latent_size, hidden_size=m.cfg.hidden_size))
    starts = torch.randn(100, m.cfg.latent_size)
    dreams = {bf16: Dream(m, c, starts, args.temperature, args.max_steps, device, bf16=bf16)
              for bf16 in (False, True)}
    params = 0.1 * np.random.default_rng(args.seed).standard_normal((args.pop_size, c.n_params))
    seeds = list(range(args.rollouts))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    default_threads = torch.get_num_threads()
    variants = [(t, bf16) for bf16 in (False, True) for t in sorted({1, default_threads})]
    wall = {v: [0, 0.0] for v in variants}
    cpu = {v: [0, 0.0] for v in variants}
    # Alternate the variants, so that all see the same machine load.
    for rep in range(args.repeats):
        for threads, bf16 in variants:
            torch.set_num_threads(threads)
            if rep == 0:
                dreams[bf16].run(params, seeds[:1])  # warm-up
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            steps = int(dreams[bf16].run(params, [s + rep * len(seeds) for s in seeds]).lengths.sum())
            sync()
            for acc, dt in ((wall, time.perf_counter() - t0), (cpu, time.process_time() - c0)):
                acc[threads, bf16][0] += steps
                acc[threads, bf16][1] += dt
    torch.set_num_threads(default_threads)
    result = {"device": str(device), "pop_size": args.pop_size, "rollouts": args.rollouts,
              "max_steps": args.max_steps}
    for bf16, tag in ((False, ""), (True, "_bf16")):
        rates = {t: n / s for (t, b), (n, s) in wall.items() if b == bf16}
        for t, rate in rates.items():
            result[f"steps_per_s_{t}_threads{tag}"] = round(rate, 1)
        result[f"steps_per_s{tag}"] = round(max(rates.values()), 1)
        if device.type == "cpu":
            n, s = cpu[1, bf16]
            result[f"steps_per_cpu_s_1_thread{tag}"] = round(n / s, 1)
    result["seconds_per_generation_of_1000_steps"] = round(
        1000 * args.pop_size * args.rollouts / result["steps_per_s"], 2)
    return result


def bench_vae(args) -> dict:
    """ConvVAE training images/s: a plain fp32 step against train_vae.py's step.

    The baseline is the textbook step: the layers called in order, fp32, Adam
    as it comes. The fast step is wm.vae_training.train_step (bf16 autocast where the
    hardware has it, ConvVAE.decode's faster forms of the transposed
    convolutions, fused Adam); `fast_fp32_img_per_s` is that step with bf16
    off. On a GPU two more are timed, the step in bf16 and the step with the
    layer forms V uses on CPUs (`bf16_img_per_s`, `cpu_forms_fp32_img_per_s`),
    since train_vae.py picks neither there. The variants alternate in rounds of --steps steps, so all see the
    same machine load, and each rate is that of its median round: on a shared
    machine a step now and then stalls for seconds, and one stall would
    otherwise decide the ratio."""
    import torch
    import torch.nn.functional as F

    from models import ConvVAE, VAEConfig
    from models.vae import vae_loss
    from wm.vae_training import make_optimizer, pick_precision, train_step
    from wm.cli import resolve_device
    from wm.frames import to_model_input

    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    frames = torch.from_numpy(np.random.default_rng(args.seed).integers(
        0, 256, (args.batch_size, 64, 64, 3), dtype=np.uint8))

    def plain_step(model, opt):
        x = to_model_input(frames, device)
        h = x
        for conv in model.enc:
            h = F.relu(conv(h))
        mu, logvar = model.fc_mu(h.flatten(1)), model.fc_logvar(h.flatten(1))
        h = model.fc_dec(model.reparameterize(mu, logvar))[:, :, None, None]
        for i, deconv in enumerate(model.dec):
            h = deconv(h)
            h = torch.sigmoid(h) if i == len(model.dec) - 1 else F.relu(h)
        loss, _, _ = vae_loss(h, x, mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()

    dtype = pick_precision("auto", device)
    # name -> train_step's autocast dtype; on a GPU also what train_vae.py does not pick
    # there: bf16, and the CPU's layer forms.
    fast = {"fast_fp32": None, "fast": dtype}
    if device.type == "cuda":
        fast.update(bf16=torch.bfloat16, cpu_forms_fp32=None)
    variants = {}
    for name in ("baseline", *fast):
        torch.manual_seed(args.seed)
        model = ConvVAE(VAEConfig()).to(device)
        if name == "baseline":
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            variants[name] = with_cpu_forms(lambda m=model, o=opt: plain_step(m, o), on=False)
        else:
            opt = make_optimizer(model, 1e-4)
            step = lambda m=model, o=opt, d=fast[name]: train_step(m, o, frames, device, d, 0.5)  # noqa: E731
            variants[name] = with_cpu_forms(step) if name == "cpu_forms_fp32" else step
    rounds = {name: [] for name in variants}
    for step in variants.values():  # warm-up: oneDNN picks its kernels on the first calls
        for _ in range(2):
            step()
    for _ in range(args.rounds):
        for name, step in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rounds[name].append(time.perf_counter() - t0)
    seconds = {name: float(np.median(times)) for name, times in rounds.items()}
    images = args.steps * args.batch_size
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if dtype is not None else "fp32",
        "batch_size": args.batch_size,
        "baseline_img_per_s": round(images / seconds["baseline"], 1),
        "fast_fp32_img_per_s": round(images / seconds["fast_fp32"], 1),
        "img_per_s": round(images / seconds["fast"], 1),
        "ratio": round(seconds["baseline"] / seconds["fast"], 2),
        **{f"{name}_img_per_s": round(images / seconds[name], 1) for name in ("bf16", "cpu_forms_fp32")
           if name in seconds},
    }


def with_cpu_forms(step, on: bool = True):
    """step, run with V's layers in the forms models/vae_cpu.py computes on
    CPUs (on), or as torch's plain layers (off)."""
    import models.vae_cpu

    def run():
        own = models.vae_cpu.applies
        models.vae_cpu.applies = lambda x: on
        try:
            step()
        finally:
            models.vae_cpu.applies = own
    return run


# Each bench's flags: (flag, type, default, the range of a number option).
# --backend and --ray-address: where time_pools runs its workers, local
# processes or Ray's actors (wm.pool.make_pool).
POOL_FLAGS = [("--backend", str, "local", None), ("--ray-address", str, "", None)]
SEED = ("--seed", int, 0, NON_NEGATIVE)
DEVICE = ("--device", str, "auto", None)

BENCHES = {
    "env": (bench_env, [("--steps", int, 300, AT_LEAST_1), SEED]),
    "mdnrnn": (bench_mdnrnn, [("--batch-size", int, 32, AT_LEAST_1), ("--seq-len", int, 100, AT_LEAST_1),
                              ("--seconds", float, 2.0, POSITIVE), DEVICE, SEED]),
    "agent": (bench_agent, [("--steps", int, 300, AT_LEAST_1), ("--episodes", int, 1, AT_LEAST_1),
                            ("--rounds", int, 3, AT_LEAST_1), ("--batch-size", int, 16, AT_LEAST_1),
                            ("--workers", int, os.cpu_count() or 1, AT_LEAST_1), ("--ckpt-dir", str, None, None),
                            SEED, *POOL_FLAGS]),
    "repeat": (bench_repeat, [("--action-repeat", str, "1,2,3", None), ("--steps", int, 300, AT_LEAST_1),
                              ("--episodes", int, 1, AT_LEAST_1), ("--rounds", int, 3, AT_LEAST_1),
                              ("--batch-size", int, 16, AT_LEAST_1), ("--ckpt-dir", str, None, None),
                              SEED, *POOL_FLAGS]),
    "dream": (bench_dream, [("--pop-size", int, 64, AT_LEAST_2), ("--rollouts", int, 16, AT_LEAST_1),
                            ("--max-steps", int, 100, AT_LEAST_1), ("--repeats", int, 2, AT_LEAST_1),
                            ("--temperature", float, 1.0, POSITIVE), DEVICE, SEED]),
    "vae": (bench_vae, [("--batch-size", int, 100, AT_LEAST_1), ("--steps", int, 3, AT_LEAST_1),
                        ("--rounds", int, 21, AT_LEAST_1), ("--threads", int, 0, NON_NEGATIVE), DEVICE, SEED]),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, (fn, flags) in BENCHES.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0])
        p.add_argument("--json", action="store_true", help="print one JSON object")
        for flag, typ, default, _ in flags:
            p.add_argument(flag, type=typ, default=default)
    args = parser.parse_args(argv)
    fn, flags = BENCHES[args.bench]
    try:
        check_ranges(vars(args), {flag[2:].replace("-", "_"): rule for flag, _, _, rule in flags if rule})
        result = fn(args)
    except UsageError as e:
        parser.error(e.message)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}  {v}")


if __name__ == "__main__":
    main()
