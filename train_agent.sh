#!/usr/bin/env bash
# The shipped agent, from scratch: the five stages with their defaults, in
# the order that made checkpoints/pretrained/ (docs/agent.md has each
# stage's hours). Every stage resumes where it stopped, so rerunning this
# after an interruption continues instead of starting over.
#
#   usage: bash train_agent.sh [CKPT_DIR] [DRIVER]
#     CKPT_DIR  where V, M and C go (default checkpoints/agent)
#     DRIVER    the folder of the C whose noisy laps M also learns from
#               (default checkpoints/pretrained/road_view, the C whose laps
#               the shipped M learned from)
set -euo pipefail
cd "$(dirname "$0")"
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # two torch threads spin-wait for each other on a busy machine
ckpt=${1:-checkpoints/agent}
driver=${2:-checkpoints/pretrained/road_view}

# 300 random rollouts and 300 of a scripted driver that follows the road at
# speeds random actions never reach; V learns from their frames.
python collect_rollouts.py
python collect_rollouts.py --seed 10300 --policy pursuit
python train_vae.py --ckpt-dir "$ckpt"
# 200 laps of a trained C with noise on its actions, so that M also sees
# competent driving (the paper's iterative procedure); M learns from all 800.
python collect_rollouts.py --rollouts 200 --seed 10600 --policy controller --ckpt-dir "$driver"
python train_mdnrnn.py --ckpt-dir "$ckpt"
python train_controller.py --ckpt-dir "$ckpt"
python evaluate.py --ckpt-dir "$ckpt" --json "$ckpt/scores.json"
