#!/usr/bin/env bash
# A finished dream recipe (experiments/dream_recipe.sh) searched again, its
# Ms and laps as they are, with a price on the gas in the dream's fitness
# (train_controller.py --dream-gas-cost): M dreams more speed than the game's
# grip allows, and across the recipe's CMA-ES runs, the more gas a C presses
# in the dream, the lower its held-out score (python -m tools.dream_rank).
# The real game only picks, on the 24 held-out tracks, as in the recipe:
#
#   1. CMA-ES in the ensemble of the recipe's two Ms, for each of COSTS and
#      each of SEEDS seeds, each run keeping its CMA-ES mean with the best
#      held-out score; the best run of them all is picked
#   2. that C times 0.9, 1 and 1.1: the best held-out score is picked
#   3. the pick over EPISODES episodes on tracks 0-99 and 400-499
#
# OUT/gas_cost_frames.json counts the real frames: the recipe's own (its
# frames.json, its pick's scores included) and every step here. Every step
# resumes or is skipped when done; the steps after a pick are made from it
# once (OUT/picked_gas_cost_run).
#
#   usage: bash experiments/dream_gas_cost.sh [OUT] [DATA]
#     OUT   the recipe's folder (default checkpoints/dream_recipe): its
#           picked_round, loop/, m2/ and frames.json
#     DATA  the recipe's laps (default data/dream_recipe): search/latents
#   COSTS="0.25 0.5 1" SEEDS=4 and the recipe's GENERATIONS=20
#   EVAL_EVERY=10 POP=32 PER_MEMBER=16 DREAM_START=20 DREAM_FRAMES=200
#   HELD_OUT=24 EPISODES=100 MAX_STEPS=1000 WORKERS=$(nproc);
#   FROM=checkpoints/pretrained (its vae.pt) PYTHON=python
set -euo pipefail
cd "$(dirname "$0")/.."
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy} SDL_AUDIODRIVER=${SDL_AUDIODRIVER:-dummy}
out=${1:-checkpoints/dream_recipe}
data=${2:-data/dream_recipe}
costs=${COSTS:-0.25 0.5 1} seeds=${SEEDS:-4} generations=${GENERATIONS:-20} eval_every=${EVAL_EVERY:-10}
pop=${POP:-32} per_member=${PER_MEMBER:-16} held_out=${HELD_OUT:-24} episodes=${EPISODES:-100}
dream_start=${DREAM_START:-20} dream_frames=${DREAM_FRAMES:-200} max_steps=${MAX_STEPS:-1000}
workers=${WORKERS:-$(nproc)} shipped=${FROM:-checkpoints/pretrained} py=${PYTHON:-python}
for f in picked_round m2/mdnrnn.pt frames.json; do
    [ -f "$out/$f" ] || { echo "error: $out has no $f; give the folder of a finished experiments/dream_recipe.sh run" >&2; exit 2; }
done
[ -d "$data/search/latents" ] || { echo "error: $data has no search/latents; give the DATA of the recipe run in $out" >&2; exit 2; }
out=$(cd "$out" && pwd) data=$(cd "$data" && pwd)
source experiments/recipe_lib.sh  # link, best, pin, scale_and_score
read -r round _ < "$out/picked_round"
round=$out/loop/$round
# 1. CMA-ES in the ensemble, the gas priced
for cost in $costs; do
    for seed in $(seq 1 "$seeds"); do
        d=$out/gas_cost_$cost/s$seed
        link $shipped/vae.pt "$d" && link "$round/mdnrnn.pt" "$d"
        "$py" train_controller.py --mode dream --ckpt-dir "$d" --latent-dir "$data/search/latents" \
            --dream-ensemble "$out/m2/mdnrnn.pt" --dream-start "$dream_start" --dream-frames "$dream_frames" \
            --dream-gas-cost "$cost" --pop-size "$pop" --rollouts-per-member "$per_member" \
            --generations "$generations" --seed "$seed" --eval-every "$eval_every" --eval-episodes "$held_out" \
            --workers "$workers" --max-steps "$max_steps"
    done
done
run=$(dirname "$(best "$out"/gas_cost_*/s*/controller.pt)")
pin gas_cost_run "${run#"$out"/}" > /dev/null
echo "picked $run"
# 2. C's scale, and 3. the scores
scale_and_score "$run" gas_cost_x
"$py" - "$out" "$pick" <<'EOF'
import csv, json, os, sys
from pathlib import Path
out, pick = map(Path, sys.argv[1:3])
def last_row(path):
    return list(csv.DictReader(open(path)))[-1]
frames = {
    "the recipe's (its frames.json)": json.loads((out / "frames.json").read_text())["real_frames"]["total"],
    "the gas-priced runs' held-out scores": sum(int(float(last_row(f)["frames"]))
                                                for f in sorted(out.glob("gas_cost_*/s*/controller_metrics.csv"))),
    "the scales' held-out scores": sum(json.loads(f.read_text())["steps"] for f in out.glob("gas_cost_x*/held_out.json")),
    "the pick's scores": sum(json.loads((pick / f).read_text())["steps"] for f in ("scores.json", "scores_unseen.json")),
}
frames["total"] = sum(frames.values())
scores = {f: json.loads((pick / f"{f}.json").read_text())["mean"] for f in ("scores", "scores_unseen")}
(out / "gas_cost_frames.json").write_text(json.dumps({"pick": os.path.relpath(pick), "scores": scores,
                                                      "real_frames": frames}, indent=1) + "\n")
for k, v in frames.items():
    print(f"{v:>12,}  {k}")
print(f"{pick}: {scores['scores']:.1f} on tracks 0-99, {scores['scores_unseen']:.1f} on 400-499")
EOF
