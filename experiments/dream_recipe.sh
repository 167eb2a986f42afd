#!/usr/bin/env bash
# A C trained only in the dream, from the shipped V, M and C, in one command,
# every real frame counted. The choices are fixed before it runs; the real
# game only picks among them, on the 24 held-out tracks:
#
#   1. laps past the grip: 20 noisy laps each of the shipped C with its gas
#      fixed at 0.7 and at 0.5 (faster than it keeps its grip), so that M
#      learns what speed costs (docs/dream.md, "What M learns of speed")
#   2. the repair loop from those laps and noisy laps of the shipped C
#      (experiments/dream_loop.py), ROUNDS rounds; the round whose C has the
#      best held-out score is picked
#   3. noisy laps of that round's C: the dreams' starts, and the data of a
#      second M, that round's M fine-tuned on them
#   4. CMA-ES in the ensemble of the two Ms (train_controller.py
#      --dream-ensemble) for each of SEEDS seeds, each run keeping its
#      CMA-ES mean with the best held-out score; the best run is picked
#   5. that C times 0.9, 1 and 1.1: the best held-out score is picked
#   6. the pick over EPISODES episodes on tracks 0-99 and 400-499
#
# frames.json in OUT counts the real frames of every step, the scores of
# step 6 included. Every step resumes or is skipped when done, so rerunning
# this after an interruption goes on where it stopped. The steps after a pick
# are made from it once: a rerun with more ROUNDS or SEEDS whose pick differs
# stops with an error instead of mixing the two picks' steps.
#
#   usage: bash experiments/dream_recipe.sh [OUT] [DATA] [FIRST_TRACK]
#     OUT          where every C and M goes (default checkpoints/dream_recipe)
#     DATA         where the laps go (default data/dream_recipe)
#     FIRST_TRACK  the laps drive tracks FIRST_TRACK, FIRST_TRACK + 1, ...
#                  (collection tracks, 10,000-99,999; default 40000)
#   FROM=checkpoints/pretrained  the folder of the V, M and C it starts from;
#   PYTHON=python                the interpreter
#   Sizes (their defaults), smaller for a quick run: GRIP_LAPS=20 FIRST_LAPS=60
#   LAPS=50 REPLAYS=100 ROUNDS=3 SEEDS=8 GENERATIONS=20 EVAL_EVERY=10 POP=32
#   PER_MEMBER=16 DREAM_START=20 DREAM_FRAMES=200 M_EPOCHS=10 TRUTH_EPISODES=4
#   HELD_OUT=24 EPISODES=100 MAX_STEPS=1000 WORKERS=$(nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy} SDL_AUDIODRIVER=${SDL_AUDIODRIVER:-dummy}
out=${1:-checkpoints/dream_recipe}
data=${2:-data/dream_recipe}
track=${3:-40000}
first_track=$track
grip_laps=${GRIP_LAPS:-20} first_laps=${FIRST_LAPS:-60} laps=${LAPS:-50} replays=${REPLAYS:-100}
rounds=${ROUNDS:-3} seeds=${SEEDS:-8} generations=${GENERATIONS:-20} eval_every=${EVAL_EVERY:-10}
pop=${POP:-32} per_member=${PER_MEMBER:-16} held_out=${HELD_OUT:-24} episodes=${EPISODES:-100}
dream_start=${DREAM_START:-20} dream_frames=${DREAM_FRAMES:-200} m_epochs=${M_EPOCHS:-10}
truth_episodes=${TRUTH_EPISODES:-4} max_steps=${MAX_STEPS:-1000} workers=${WORKERS:-$(nproc)}
shipped=${FROM:-checkpoints/pretrained} py=${PYTHON:-python}
for f in vae.pt mdnrnn.pt controller.pt; do
    [ -f "$shipped/$f" ] || { echo "error: FROM=$shipped has no $f; give the folder of the V, M and C to start from" >&2; exit 2; }
done
m_size=$("$py" -c "import sys; from wm.checkpoint import load_checkpoint
a = load_checkpoint(sys.argv[1], 'mdnrnn')['model_args']; print(a['hidden_size'], a['n_gaussians'])" "$shipped/mdnrnn.pt")
mkdir -p "$out" "$data"
out=$(cd "$out" && pwd) data=$(cd "$data" && pwd)
laps_flags=(--policy controller --noise 0.1 --workers "$workers" --max-steps "$max_steps" --action-repeat 2)
held_out_flags=(--eval-every "$eval_every" --eval-episodes "$held_out" --workers "$workers" --max-steps "$max_steps")

source experiments/recipe_lib.sh  # link, best, pin, scale_and_score

# 1. laps past the grip
for gas in 0.7 0.5; do
    [ -f "$out/gas_$gas/controller.pt" ] ||
        "$py" -m tools.scale_controller --ckpt-dir $shipped --scale 1 --gas $gas --out-dir "$out/gas_$gas"
    "$py" collect_rollouts.py --rollouts "$grip_laps" --seed "$track" --ckpt-dir "$out/gas_$gas" \
        --out-dir "$data/loop/rollouts" "${laps_flags[@]}"
    track=$((track + grip_laps))
done
# 2. the repair loop
"$py" -m experiments.dream_loop --out-dir "$out/loop" --data-dir "$data/loop/rollouts" --latent-dir "$data/loop/latents" \
    --vae $shipped/vae.pt --mdnrnn $shipped/mdnrnn.pt --first-driver $shipped \
    --seed "$track" --first-rollouts "$first_laps" --rollouts "$laps" --replays "$replays" --rounds "$rounds" \
    --m-epochs "$m_epochs" --dream-start "$dream_start" --dream-frames "$dream_frames" \
    --truth-episodes "$truth_episodes" --generations "$generations" --pop-size "$pop" --rollouts-per-member "$per_member" \
    --eval-every "$eval_every" --eval-episodes "$held_out" --max-steps "$max_steps" --workers "$workers"
track=$((track + first_laps + (rounds - 1) * laps))
round=$(dirname "$(best "$out"/loop/round_*/controller.pt)")
track=$(pin round "$(basename "$round")" "$track")  # the laps' tracks, as first run
echo "picked $round"
# 3. laps of that round's C, and the second M
"$py" collect_rollouts.py --rollouts "$laps" --seed "$track" --ckpt-dir "$round" \
    --out-dir "$data/search/rollouts" "${laps_flags[@]}"
link $shipped/vae.pt "$out/m2"
[ -f "$out/m2/mdnrnn.pt" ] ||
    "$py" train_mdnrnn.py --data-dir "$data/search/rollouts" --latent-dir "$data/search/latents" --ckpt-dir "$out/m2" \
        --init-from "$round/mdnrnn.pt" --epochs "$m_epochs" --lr 3e-4 \
        --hidden-size "${m_size% *}" --n-gaussians "${m_size#* }"
# 4. CMA-ES in the ensemble
for seed in $(seq 1 "$seeds"); do
    d=$out/ensemble_s$seed
    link $shipped/vae.pt "$d" && link "$round/mdnrnn.pt" "$d"
    "$py" train_controller.py --mode dream --ckpt-dir "$d" --latent-dir "$data/search/latents" \
        --dream-ensemble "$out/m2/mdnrnn.pt" --dream-start "$dream_start" --dream-frames "$dream_frames" \
        --pop-size "$pop" --rollouts-per-member "$per_member" --generations "$generations" --seed "$seed" \
        "${held_out_flags[@]}"
done
run=$(dirname "$(best "$out"/ensemble_s*/controller.pt)")
pin run "$(basename "$run")" > /dev/null
echo "picked $run"
# 5. C's scale, and 6. the scores
scale_and_score "$run" scaled_x
"$py" - "$out" "$data" "$pick" "$first_track" "$grip_laps" <<'EOF'
import csv, json, os, sys
from pathlib import Path
from wm.rollouts import game_frames, rollout_path
out, data, pick = map(Path, sys.argv[1:4])
first, grip_laps = map(int, sys.argv[4:])
def last_row(path):
    return list(csv.DictReader(open(path)))[-1]
frames = {
    "laps past the grip": game_frames(rollout_path(data / "loop/rollouts", s) for s in range(first, first + 2 * grip_laps)),
    "the loop (laps, held-out scores, truth, replays)": int(last_row(out / "loop/loop_metrics.csv")["real_frames"]),
    "the picked round's laps": game_frames(sorted((data / "search/rollouts").glob("rollout_*.npz"))),
    "the ensemble's held-out scores": sum(int(float(last_row(f)["frames"]))
                                          for f in sorted(out.glob("ensemble_s*/controller_metrics.csv"))),
    "the scales' held-out scores": sum(json.loads(f.read_text())["steps"] for f in out.glob("scaled_x*/held_out.json")),
    "the pick's scores": sum(json.loads((pick / f).read_text())["steps"] for f in ("scores.json", "scores_unseen.json")),
}
frames["total"] = sum(frames.values())
scores = {f: json.loads((pick / f"{f}.json").read_text())["mean"] for f in ("scores", "scores_unseen")}
(out / "frames.json").write_text(json.dumps({"pick": os.path.relpath(pick), "scores": scores, "real_frames": frames}, indent=1) + "\n")
for k, v in frames.items():
    print(f"{v:>12,}  {k}")
print(f"{pick}: {scores['scores']:.1f} on tracks 0-99, {scores['scores_unseen']:.1f} on 400-499")
EOF
