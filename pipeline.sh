#!/usr/bin/env bash
# The reference run of docs/experiments.md, stage after stage, with the
# paper's settings at a small scale (the road view, every frame, V's rate
# constant, no early stop): 200 random rollouts, V for one epoch, M for 30,
# C for 7 generations of 16 members in the real game, then 100 episodes of
# the official CarRacing-v3; roughly half an hour on 2 idle cores. Every
# stage resumes where it stopped, so rerunning this after an interruption
# continues rather than starting over.
set -euo pipefail
cd "$(dirname "$0")"
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy}
# Two torch threads spin-wait for each other on a busy machine; passive
# waiting costs nothing on an idle one.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

python collect_rollouts.py --rollouts 200 --view road --action-repeat 1
python train_vae.py --epochs 1 --view road --recon-weighting plain --lr 1e-4 --lr-schedule constant
python train_mdnrnn.py --epochs 30
# C in the real game: at equal wall-clock time it beat C trained in M's
# dream here (docs/dream.md has the dream's commands).
python train_controller.py --pop-size 16 --rollouts-per-member 1 --workers 2 \
    --generations 7 --eval-every 2 --eval-episodes 4 --patience 0
python evaluate.py --episodes 100 --json checkpoints/scores.json --video checkpoints/drive.gif
