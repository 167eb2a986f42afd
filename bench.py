"""Speed measurements, each as a ratio measured in one run on this machine.

    python bench.py env --steps 300 --json     stock vs fast CarRacing-v3
    python bench.py vae --json                 ConvVAE training images/s
    python bench.py mdnrnn --json              MDN-RNN sequences/s, cell steps/s
    python bench.py agent --json               agent loop steps/s, 1 vs all workers
    python bench.py dream --json               simulated dream steps/s

Each subcommand prints one JSON object with --json, else one line per number.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import numpy as np  # noqa: E402


def bench_env(args) -> dict:
    """Step the stock and the fast environment on the same seed and actions,
    alternating in chunks so both see the same machine load."""
    from wm.env import make_env

    rng = np.random.default_rng(args.seed)
    actions = brownian_actions(rng, args.steps)
    stock, fast = make_env(fast=False), make_env(fast=True)
    times = {"stock": 0.0, "fast": 0.0}
    identical = True
    steps = 0
    envs = {"stock": stock, "fast": fast}
    obs = {k: e.reset(seed=args.seed)[0] for k, e in envs.items()}
    identical &= np.array_equal(obs["stock"], obs["fast"])
    chunk = 50
    for start in range(0, args.steps, chunk):
        for name, env in envs.items():
            t0 = time.perf_counter()
            for a in actions[start:start + chunk]:
                o, r, term, trunc, _ = env.step(a)
                if term or trunc:
                    o, _ = env.reset(seed=args.seed + 1)
                obs[name] = o
            times[name] += time.perf_counter() - t0
        identical &= np.array_equal(obs["stock"], obs["fast"])
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


BENCHES = {
    "env": (bench_env, [("--steps", int, 300), ("--seed", int, 0)]),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, (fn, flags) in BENCHES.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").splitlines()[0])
        p.add_argument("--json", action="store_true", help="print one JSON object")
        for flag, typ, default in flags:
            p.add_argument(flag, type=typ, default=default)
    args = parser.parse_args(argv)
    fn = BENCHES[args.bench][0]
    result = fn(args)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}  {v}")


if __name__ == "__main__":
    main()
