#!/usr/bin/env bash
# The PPO baselines beside CMA-ES, from scratch: PPO on pixels, on z and on
# [z, h] for every seed, each run scored on the official CarRacing-v3
# (evaluate.py's tracks 0-99), then the curves and the table. Every step
# resumes where it stopped or is skipped when done, so rerunning this after
# an interruption continues instead of starting over.
#
#   usage: bash experiments/train_ppo.sh [CKPT_DIR] [FRAMES]
#     CKPT_DIR  vae.pt and mdnrnn.pt for the latent arms; M must have learned
#               every 2nd frame, the runs' frame skip (default
#               checkpoints/pretrained/road_view, the V and M of the road view
#               that the committed runs read, which did)
#     FRAMES    each run's budget in game frames (default 1000000)
#   SEEDS=0,1,2 the seeds; CMAES=zh=CSV,z=CSV the CMA-ES runs drawn beside
#   (default: the shipped run's, on [z, h], and CMA-ES on z alone at frame
#   skip 2, which this trains in checkpoints/ppo/cmaes_z with CKPT_DIR's V)
set -euo pipefail
cd "$(dirname "$0")/.."
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
ckpt=${1:-checkpoints/pretrained/road_view}
frames=${2:-1000000}
workers=${WORKERS:-$(nproc)}
out=checkpoints/ppo

# score JSON MODEL FLAGS...: evaluate.py over 100 episodes, once per model
# (training further writes a newer MODEL, which is scored again).
score() {
    local json=$1 model=$2
    shift 2
    [ "$json" -nt "$model" ] || python evaluate.py "$@" --episodes 100 --workers "$workers" --json "$json"
}

for arm in pixels z zh; do
    python -m experiments.train_ppo --arm "$arm" --ckpt-dir "$ckpt" --frames "$frames" --seeds "${SEEDS:-0,1,2}" --out-dir "$out"
done
for run in "$out"/*/seed*; do
    [ -f "$run/ppo_last.zip" ] || continue
    # its mean action, then its sampled actions
    score "$run/scores.json" "$run/ppo_last.zip" --policy ppo --ckpt-dir "$run"
    score "$run/scores_stochastic.json" "$run/ppo_last.zip" --policy ppo --stochastic --ckpt-dir "$run"
done
# CMA-ES on z alone at the runs' frame skip, 30 generations of 32 x 4 tracks (about 3M frames),
# in its own folder, reading V from CKPT_DIR through a relative link.
cz=$out/cmaes_z
mkdir -p "$cz"
[ -e "$cz/vae.pt" ] || ln -s "$(realpath --relative-to="$cz" "$ckpt/vae.pt")" "$cz/vae.pt"
# A finished run is kept without its CMA-ES state: its controller.pt alone means done.
if [ ! -f "$cz/controller.pt" ] || [ -f "$cz/controller_es.npz" ]; then
    python train_controller.py --ckpt-dir "$cz" --features z --action-repeat 2 --pop-size 32 --rollouts-per-member 4 \
        --patience 200 --eval-every 5 --eval-episodes 48 --generations 30 --workers "$workers"
fi
score "$cz/scores.json" "$cz/controller.pt" --ckpt-dir "$cz"
python -m experiments.compare_ppo --runs-dir "$out" --cmaes "${CMAES:-zh=checkpoints/pretrained/road_view/controller_metrics.csv,z=$cz/controller_metrics.csv}"
