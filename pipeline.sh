#!/usr/bin/env bash
# The reference run, stage after stage, as the README reports it: 200 random
# rollouts, V for one epoch, M for 30, C in M's dream, then 100 episodes of
# the official CarRacing-v3. Every stage resumes where it stopped, so
# rerunning this after an interruption continues rather than starting over.
set -euo pipefail
cd "$(dirname "$0")"
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy}
# Two torch threads spin-wait for each other on a busy machine; passive
# waiting costs nothing on an idle one.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

python collect_rollouts.py --rollouts 200
python train_vae.py --epochs 1
python train_mdnrnn.py --epochs 30
mkdir -p checkpoints/dream
cp checkpoints/vae.pt checkpoints/mdnrnn.pt checkpoints/dream/
python train_controller.py --mode dream --ckpt-dir checkpoints/dream --latent-dir data/latents \
    --temperature 1.15 --bf16 --pop-size 64 --rollouts-per-member 16 --workers 2 \
    --generations 60 --eval-every 5 --eval-episodes 4
python evaluate.py --ckpt-dir checkpoints/dream --episodes 100 --json checkpoints/dream/scores.json \
    --video checkpoints/dream/drive.gif
