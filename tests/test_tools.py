"""tools/: the probe (the game's true state, the ridge fit, the command end to end) and the curves of CMA-ES runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import error_line, run_script, write_tiny_world_model

from tools import probe


def game(position, angle, velocity=(0.0, 0.0), spin=0.0):
    """A stand-in for CarRacing's unwrapped env: a straight road north along x = 0."""
    hull = SimpleNamespace(position=position, angle=angle, linearVelocity=velocity, angularVelocity=spin)
    track = [(0.0, 0.0, 0.0, float(y)) for y in range(0, 100, 5)]
    return SimpleNamespace(car=SimpleNamespace(hull=hull), track=track)


def test_the_true_state_is_read_off_the_car_and_the_road():
    speed, spin, heading, offset = probe.true_state(game((2.0, 12.0), 0.0, (3.0, 4.0), -0.7))
    assert speed == pytest.approx(5.0) and spin == pytest.approx(-0.7)
    assert heading == pytest.approx(0.0)  # facing along the road (car_racing.py: forward is (-sin, cos))
    assert offset == pytest.approx(-2.0)  # 2 to the road's right (+x, facing +y)
    _, _, heading, offset = probe.true_state(game((-1.5, 40.0), 0.3))
    assert heading == pytest.approx(0.3) and offset == pytest.approx(1.5)  # turned left, left of centre
    assert probe.true_state(game((0.0, 40.0), math.pi - 0.1))[2] == pytest.approx(math.pi - 0.1)


def test_the_ridge_probe_against_least_squares():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(200, 6)) for _ in range(5)]
    w = rng.normal(size=(6, 4))
    linear = [x @ w + 3.0 for x in xs]
    scores = probe.probe(xs, linear, n_test=2)
    assert all(v > 0.999 for v in scores.values())
    # An exact fit's predictions match numpy's least squares with an intercept.
    x, y = np.concatenate(xs), np.concatenate(linear)
    ones = np.c_[x, np.ones(len(x))]
    fit = probe.ridge(x, y, 1e-8)
    assert np.allclose(fit(x), ones @ np.linalg.lstsq(ones, y, rcond=None)[0], atol=1e-4)
    noise = [rng.normal(size=(200, 4)) for _ in range(5)]
    assert all(v < 0.05 for v in probe.probe(xs, noise, n_test=2).values())


def test_the_probe_command_writes_its_table_and_plot(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_tiny_world_model(ckpt, view="full")
    out, png = tmp_path / "probe.json", tmp_path / "probe.png"
    r = run_script("-m", "tools.probe", "--ckpt-dirs", str(ckpt), "--episodes", "3", "--test-episodes", "1",
                   "--max-steps", "40", "--action-repeat", "1", "--json", str(out), "--png", str(png))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["steps"] == 120 and result["action_repeat"] == 1
    assert set(result["r2"]) == {"frame", str(ckpt)}
    assert set(result["r2"][str(ckpt)]) == {"z", "zh"}
    for scores in [result["r2"]["frame"]["dashboard"], *result["r2"][str(ckpt)].values()]:
        assert set(scores) == set(probe.TARGETS) and all(v <= 1 for v in scores.values())
    assert png.stat().st_size > 1000 and str(ckpt) in r.stdout

    # An M of another rate than the driver's is refused, in one line.
    line = error_line(run_script("-m", "tools.probe", "--ckpt-dirs", str(ckpt), "--episodes", "3",
                                 "--test-episodes", "1", "--max-steps", "20"))
    assert "--action-repeat 1" in line
    assert "--test-episodes" in error_line(run_script("-m", "tools.probe", "--episodes", "3",
                                                      "--test-episodes", "2"))


def test_the_curves_of_two_runs_side_by_side(tmp_path):
    from wm.metrics import MetricsLog

    for name, offset in (("a", 0.0), ("b", 100.0)):
        log = MetricsLog(tmp_path / name / "controller_metrics.csv", step_key="generation")
        log.extend([{"generation": g, "mean": g + offset, **({"held_out": 10 * g} if g % 5 == 0 else {})}
                    for g in range(1, 13 if name == "a" else 11)])
    png = tmp_path / "curves.png"
    r = run_script("-m", "tools.curves", "--runs", f"a={tmp_path / 'a'},b={tmp_path / 'b'}", "--png", str(png))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert rows == [["5", "5.0", "50.0", "105.0", "50.0"], ["10", "10.0", "100.0", "110.0", "100.0"]]
    assert png.stat().st_size > 1000
    assert "not found" in error_line(run_script("-m", "tools.curves", "--runs", f"a={tmp_path / 'none'}"))


def test_the_dream_truth_command_measures_a_ladder(tmp_path):
    """Real, dreamed and replayed returns of a C's ladder, on the real game
    and in a tiny untrained M; what follows from the definitions holds."""
    from conftest import write_tiny_controller

    ckpt = tmp_path / "ckpt"
    write_tiny_world_model(ckpt)
    write_tiny_controller(ckpt, seed=1)
    out, png = tmp_path / "truth.json", tmp_path / "truth.png"
    r = run_script("-m", "tools.dream_truth", "--ckpt-dir", str(ckpt), "--episodes", "2", "--scales", "0,0.5,1",
                   "--max-steps", "30", "--json", str(out), "--png", str(png))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = result["controllers"]
    assert list(rows) == [f"{ckpt / 'controller.pt'} x{s}" for s in ("0", "0.5", "1")]
    for row in rows.values():
        assert row["exploit_gap"] == pytest.approx(row["dreamed"] - row["replayed"])
        assert [ep["seed"] for ep in row["episodes"]] == [100_000, 100_001]
        for ep in row["episodes"]:
            assert 1 <= ep["dream_steps"] <= 30 and ep["real"] > -100
            assert ep["distance"][0] < 0.01  # the dream starts from the real first frame (V batched otherwise)
            assert 0 < ep["faithful_steps"] <= ep["dream_steps"]
    assert -1 <= result["rank_correlation"] <= 1 and png.stat().st_size > 1000
    assert result["real_frames"] >= sum(ep["dream_steps"] for row in rows.values() for ep in row["episodes"])

    # From step 5 of C's real episode: the replay of C's own 5 actions brings
    # the game back to the frame the dream starts from.
    r = run_script("-m", "tools.dream_truth", "--ckpt-dir", str(ckpt), "--episodes", "1", "--scales", "0,1",
                   "--max-steps", "30", "--start-step", "5", "--dream-frames", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for row in json.loads(out.read_text())["controllers"].values():
        ep = row["episodes"][0]
        assert ep["distance"][0] < 0.01 and 1 <= ep["dream_steps"] <= 8
        assert ep["real_frames"] >= ep["dream_steps"] + 5  # the episode, then 5 steps back and the replay
    assert "--start-step 40" in error_line(run_script("-m", "tools.dream_truth", "--ckpt-dir", str(ckpt),
                                                      "--max-steps", "30", "--start-step", "40"))

    # Bad input is one line.
    assert "--scales" in error_line(run_script("-m", "tools.dream_truth", "--ckpt-dir", str(ckpt),
                                               "--scales", "half"))
    assert "no such file" in error_line(run_script("-m", "tools.dream_truth", "--ckpt-dir", str(ckpt),
                                                   "--controllers", str(tmp_path / "none.pt")))
    write_tiny_world_model(tmp_path / "other", seed=2)
    assert "trained with another vae.pt" in error_line(run_script(
        "-m", "tools.dream_truth", "--ckpt-dir", str(tmp_path / "other"), "--controllers",
        str(ckpt / "controller.pt")))


def test_a_scaled_controller_is_a_rung_of_the_ladder_that_evaluate_plays(tmp_path):
    """tools.scale_controller writes the truth's rung x0.5 as a controller.pt:
    the same flat weights as tools.dream_truth scales, the V and M's
    fingerprints kept, and links to that V and M, so evaluate.py plays it."""
    import torch
    from conftest import write_tiny_controller

    from models.controller import Controller

    ckpt, out_dir = tmp_path / "ckpt", tmp_path / "scaled"
    write_tiny_world_model(ckpt)
    write_tiny_controller(ckpt, seed=1)
    r = run_script("-m", "tools.scale_controller", "--ckpt-dir", str(ckpt), "--scale", "0.5", "--out-dir", str(out_dir))
    assert r.returncode == 0, r.stderr
    for model in ("vae.pt", "mdnrnn.pt"):
        assert (out_dir / model).is_symlink() and (out_dir / model).resolve() == (ckpt / model).resolve()
    source = torch.load(ckpt / "controller.pt", weights_only=True)
    scaled = torch.load(out_dir / "controller.pt", weights_only=True)
    flat = Controller.from_checkpoint(source).get_flat()
    assert np.allclose(Controller.from_checkpoint(scaled).get_flat(), 0.5 * flat) and np.abs(flat).max() > 0
    assert scaled["scale"] == 0.5 and "held_out" not in scaled and scaled["fingerprint"] != source["fingerprint"]
    assert scaled["vae_fingerprint"] == source["vae_fingerprint"]
    played = tmp_path / "played.json"
    r = run_script("evaluate.py", "--ckpt-dir", str(out_dir), "--episodes", "1", "--max-steps", "20",
                   "--workers", "1", "--json", str(played))
    assert r.returncode == 0, r.stderr
    assert "times 0.5" in r.stdout and json.loads(played.read_text())["episodes"] == 1

    # Scaled again, it records the product, from the C it first came from.
    again = tmp_path / "again"
    r = run_script("-m", "tools.scale_controller", "--ckpt-dir", str(out_dir), "--scale", "0.5", "--out-dir", str(again))
    assert r.returncode == 0, r.stderr
    twice = torch.load(again / "controller.pt", weights_only=True)
    assert twice["scale"] == 0.25 and twice["scaled_from"] == scaled["scaled_from"] == str(ckpt / "controller.pt")
    assert np.allclose(Controller.from_checkpoint(twice).get_flat(), 0.25 * flat)
    assert (again / "vae.pt").resolve() == (ckpt / "vae.pt").resolve()

    # Bad input is one line, and the source is never overwritten.
    assert "--scale" in error_line(run_script("-m", "tools.scale_controller", "--ckpt-dir", str(ckpt),
                                              "--scale", "-1", "--out-dir", str(out_dir)))
    assert "replace" in error_line(run_script("-m", "tools.scale_controller", "--ckpt-dir", str(ckpt),
                                              "--out-dir", str(ckpt)))
    assert "--out-dir" in error_line(run_script("-m", "tools.scale_controller", "--ckpt-dir", str(ckpt)))
    assert "not found" in error_line(run_script("-m", "tools.scale_controller", "--ckpt-dir",
                                                str(tmp_path / "none"), "--out-dir", str(out_dir)))
    assert torch.equal(torch.load(ckpt / "controller.pt", weights_only=True)["model"]["net.weight"],
                       source["model"]["net.weight"])


def test_a_fixed_gas_is_constant_and_the_dream_picks_it(tmp_path):
    """tools.scale_controller --gas writes C times --scale with its gas at that
    constant, for any frame, its steering and brake the scaled C's; and
    tools.dream_gas dreams those variants: each row's return is that C's own
    in the dream, dreamed alone on the same seeds."""
    import csv

    import torch
    from conftest import write_tiny_controller
    from test_dream import write_tiny_latents

    from models.controller import Controller
    from wm.checkpoint import load_checkpoint
    from wm.dream import make_dream

    ckpt, out_dir = tmp_path / "ckpt", tmp_path / "gas"
    write_tiny_world_model(ckpt)
    write_tiny_controller(ckpt, seed=1)
    write_tiny_world_model(out_dir)
    r = run_script("-m", "tools.scale_controller", "--ckpt-dir", str(ckpt), "--scale", "0.5", "--gas", "0.3",
                   "--out-dir", str(out_dir))
    assert r.returncode == 0, r.stderr
    source = Controller.from_checkpoint(torch.load(ckpt / "controller.pt", weights_only=True))
    fixed_ckpt = torch.load(out_dir / "controller.pt", weights_only=True)
    fixed = Controller.from_checkpoint(fixed_ckpt)
    assert fixed_ckpt["gas"] == 0.3 and fixed_ckpt["scale"] == 0.5
    halved = Controller(source.cfg)
    halved.set_flat(0.5 * source.get_flat())
    z, h = torch.randn(50, source.cfg.latent_size) * 3, torch.randn(50, source.cfg.hidden_size)
    with torch.no_grad():
        ours, theirs = fixed(z, h), halved(z, h)
    assert torch.allclose(ours[:, 1], torch.full((50,), 0.3), atol=1e-6) and theirs[:, 1].std() > 0.01
    assert torch.allclose(ours[:, [0, 2]], theirs[:, [0, 2]])
    r = run_script("evaluate.py", "--ckpt-dir", str(out_dir), "--episodes", "1", "--max-steps", "10", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "gas fixed at 0.3" in r.stdout

    latents = tmp_path / "latents"
    write_tiny_latents(latents, load_checkpoint(ckpt / "vae.pt", "vae")["fingerprint"], n=3, steps=30)
    table = tmp_path / "gas.csv"
    r = run_script("-m", "tools.dream_gas", "--ckpt-dir", str(ckpt), "--latent-dir", str(latents), "--scales", "0.5,1",
                   "--gases", "0.3", "--dream-start", "5", "--dream-frames", "12", "--dreams", "6", "--sets", "2",
                   "--seed", "7", "--csv", str(table))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(table.open()))
    assert [(row["scale"], row["gas"]) for row in rows] == [("0.5", "own"), ("0.5", "0.3"), ("1.0", "own"), ("1.0", "0.3")]
    dream, _ = make_dream(ckpt, source, latents, max_steps=12, start_step=5)
    for row, c in [(rows[1], fixed), (rows[2], source)]:
        for s, seeds in [("set_1", range(7, 13)), ("set_2", range(13, 19))]:
            alone = dream.run(c.get_flat()[None], list(seeds)).returns.mean().item()
            assert float(row[s]) == pytest.approx(alone, abs=0.01)
        assert float(row["mean"]) == pytest.approx((float(row["set_1"]) + float(row["set_2"])) / 2, abs=0.01)
    assert float(rows[1]["gas_mean"]) == float(rows[1]["gas_median"]) == 0.3
    assert 0 <= float(rows[2]["gas_median"]) <= 1 and float(rows[2]["gas_mean"]) != 0.3

    # Bad input is one line.
    assert "--gas" in error_line(run_script("-m", "tools.scale_controller", "--ckpt-dir", str(ckpt), "--gas", "1",
                                            "--out-dir", str(out_dir)))
    assert "--gases" in error_line(run_script("-m", "tools.dream_gas", "--ckpt-dir", str(ckpt), "--latent-dir",
                                              str(latents), "--gases", "0,2"))
    assert "latent" in error_line(run_script("-m", "tools.dream_gas", "--ckpt-dir", str(ckpt), "--latent-dir",
                                             str(tmp_path / "none")))


def test_dream_rank_replays_each_run_to_its_held_out_generations_and_dreams_them(tmp_path):
    """Two tiny dream-mode runs, each scored on the held-out tracks at
    generations 2 and 4: the tool finds those 4 CMA-ES means, among them each
    run's controller.pt, dreams them in M and in another M, and writes each
    as a playable folder; a C's dreamed return is what it dreams alone."""
    import csv
    import shutil

    from test_dream import dream_config, dream_setup, write_other_m

    import train_controller
    from models.controller import Controller
    from wm.checkpoint import load_checkpoint
    from wm.dream import make_dream

    ckpt, latents = dream_setup(tmp_path)
    runs = [tmp_path / "run_1", tmp_path / "run_2"]
    for seed, run in enumerate(runs, 1):
        run.mkdir()
        for f in ("vae.pt", "mdnrnn.pt"):
            shutil.copy(ckpt / f, run / f)
        train_controller.main(dream_config(run, latents, generations=4, eval_every=2, seed=seed))
    # The tiny game scores every C alike: held-out scores that differ, written in, give the ranks to correlate.
    written_in = ({2: 100.0, 4: 300.0}, {2: 400.0, 4: 200.0})
    for run, scores in zip(runs, written_in):
        path = run / "controller_metrics.csv"
        rows = list(csv.DictReader(open(path)))
        for row in rows:
            row["held_out"] = scores.get(int(row["generation"]), row["held_out"])
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, rows[0].keys())
            w.writeheader()
            w.writerows(rows)
    other = write_other_m(tmp_path / "other.pt", ckpt, seed=5)
    out, written = tmp_path / "rank.json", tmp_path / "cs"
    r = run_script("-m", "tools.dream_rank", "--runs", str(tmp_path / "run_*"), "--ensemble", str(other),
                   "--latent-dir", str(latents), "--variants", "0:30:1,3:8:1.5", "--dreams", "6",
                   "--json", str(out), "--write-dir", str(written))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    cands = result["controllers"]
    assert [(c["run"], c["generation"]) for c in cands] == [(str(run), g) for run in runs for g in (2, 4)]
    for c in cands:
        rows = {int(row["generation"]): row for row in csv.DictReader(open(Path(c["run"]) / "controller_metrics.csv"))}
        assert c["held_out"] == pytest.approx(float(rows[c["generation"]]["held_out"]))
        assert c["population_dreamed"] == pytest.approx(float(rows[c["generation"]]["mean"]))
        for variant in ("0:30:1", "3:8:1.5"):
            assert c[f"{variant} mean"] == pytest.approx((c[f"{variant} mdnrnn.pt"] + c[f"{variant} {other}"]) / 2,
                                                         abs=0.02)
            assert 0 <= c[f"{variant} mdnrnn.pt gas"] <= 1
    names = ["population_dreamed"] + [f"{v} {m}{g}" for v in ("0:30:1", "3:8:1.5")
                                      for m in ("mdnrnn.pt", other, "mean") for g in ("", " gas")]
    assert sorted(result["rho"]) == sorted(names)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731  (no ties here)
    for name, rho in result["rho"].items():
        values = [c[name] for c in cands]
        assert rho == pytest.approx(np.corrcoef(ranks([c["held_out"] for c in cands]), ranks(values))[0, 1])
    # Each run's controller.pt is its best scored mean, written again with its links.
    for run, scores in zip(runs, written_in):
        best = load_checkpoint(run / "controller.pt", "controller")
        folder = written / f"{run.name}_g{best['generation']}"
        mine = load_checkpoint(folder / "controller.pt", "controller")
        np.testing.assert_allclose(Controller.from_checkpoint(mine).get_flat(),
                                   Controller.from_checkpoint(best).get_flat(), atol=1e-6)
        assert mine["held_out"] == scores[best["generation"]] and (folder / "mdnrnn.pt").is_symlink()
    # A C's dreamed return, dreamed alone on the same seeds.
    c = cands[1]
    controller = Controller.from_checkpoint(load_checkpoint(written / "run_1_g4" / "controller.pt", "controller"))
    dream, _ = make_dream(ckpt, controller, latents, 1.0, 30)
    alone = dream.run(controller.get_flat()[None], list(range(7000, 7006)))
    assert float(alone.returns.mean()) == pytest.approx(c["0:30:1 mdnrnn.pt"], abs=0.01)
    gas = float(alone.gas.sum() / (alone.lengths.sum() * dream.action_repeat))
    assert gas == pytest.approx(c["0:30:1 mdnrnn.pt gas"], abs=1e-3)
    # Bad input is one line.
    assert "no controller_es.npz" in error_line(run_script("-m", "tools.dream_rank", "--runs", str(tmp_path / "none"),
                                                           "--latent-dir", str(latents)))
    assert "start:frames:temperature" in error_line(run_script(
        "-m", "tools.dream_rank", "--runs", str(runs[0]), "--latent-dir", str(latents), "--variants", "20:x"))
