#!/usr/bin/env bash
# The shipped agent, from scratch: the recipe behind checkpoints/pretrained/.
# Every stage resumes where it stopped, so rerunning this after an
# interruption continues instead of starting over; the controller stage is
# the long one (see the README's ledger for the hours each stage took).
#
#   usage: bash train_agent.sh [CKPT_DIR] [GENERATIONS]
#     CKPT_DIR     where V, M and C go (default checkpoints/agent; pass
#                  checkpoints/pretrained to go on training the shipped run)
#     GENERATIONS  CMA-ES generations in all, counting those already done
#                  (default 300)
#   ACTION_REPEAT=k  frames each action is held by M and C (default 2, the
#                  shipped agent's; 1 is the paper's)
#   ROLLOUTS=n       tracks each CMA-ES member drives a generation (default 4;
#                  the random-data run drove 8 from generation 142 on)
#   POP=n            CMA-ES population (default 32); another one on a resume
#                  goes on from the mean and step size (the shipped run: 64
#                  from generation 162)
#   HELD_OUT=n       held-out tracks that choose controller.pt (default 48;
#                  the shipped run had 16 up to generation 80)
#   RACE=1           successive halving: every member drives half of the
#                  ROLLOUTS tracks, only the better half drives the rest
#   RESET_SIGMA=s    on resuming, widen CMA-ES's step size to s once (the
#                  random-data run: 0.05 at generation 203)
#   VAE=path         reuse this vae.pt instead of training V (DRIVE=1 only;
#                  the k = 1 run in checkpoints/pretrained/drive_k1 reuses the
#                  shipped V, which learned from the same tracks' frames)
#   DRIVE=0          V and M learn from random rollouts only, as in the paper:
#                  the earlier run in checkpoints/pretrained/random_data. By
#                  default (DRIVE=1) they learn from 300 random rollouts and
#                  300 of a scripted driver that follows the road (--policy
#                  pursuit), all holding each action k frames (docs/agent.md)
set -euo pipefail
cd "$(dirname "$0")"
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
ckpt=${1:-checkpoints/agent}
generations=${2:-300}
workers=${WORKERS:-$(nproc)}
k=${ACTION_REPEAT:-2}
rollouts_per_member=${ROLLOUTS:-4}
pop_size=${POP:-32}
reset_sigma=${RESET_SIGMA:-0}
held_out=${HELD_OUT:-48}
if [ -n "${VAE:-}" ] && [ ! -f "$VAE" ]; then
    echo "VAE=$VAE: no such file; give the vae.pt to reuse, or leave VAE out to train V" >&2; exit 2
fi
race=()
if [ "${RACE:-0}" = 1 ]; then race=(--race); fi

# V and M, unless they are finished and shipped (mdnrnn.pt without the
# mdnrnn_last.pt that training leaves behind, which git does not keep).
if [ ! -f "$ckpt/mdnrnn.pt" ] || [ -f "$ckpt/mdnrnn_last.pt" ]; then
    if [ "${DRIVE:-1}" = 1 ]; then
        # One folder serves V and M: every k-th frame of 600 rollouts, half of
        # them driven along the road at speeds that random actions never reach.
        rollouts=data/rollouts_drive_k$k latents=data/latents_drive_k$k
        python collect_rollouts.py --rollouts 300 --workers "$workers" --action-repeat "$k" --out-dir "$rollouts"
        python collect_rollouts.py --rollouts 300 --workers "$workers" --action-repeat "$k" --out-dir "$rollouts" \
            --seed 10300 --policy pursuit
        if [ -n "${VAE:-}" ]; then
            mkdir -p "$ckpt"  # a link, not a second copy
            cmp -s "$VAE" "$ckpt/vae.pt" || ln -sf "$(realpath --relative-to="$ckpt" "$VAE")" "$ckpt/vae.pt"
        else
            python train_vae.py --ckpt-dir "$ckpt" --data-dir "$rollouts" --epochs 3
        fi
    else
        # V learns from every frame of 400 random rollouts, of collection's own
        # tracks (10,000 on). The random-data V's were tracks 0-399 (--seed 0),
        # which evaluate.py also scores: it says so.
        python collect_rollouts.py --rollouts 400 --workers "$workers"
        python train_vae.py --ckpt-dir "$ckpt" --epochs 3
        # M models every k-th frame, so it learns from rollouts that hold each
        # random action k frames (a folder of their own).
        rollouts=data/rollouts latents=data/latents
        if [ "$k" != 1 ]; then
            rollouts=data/rollouts_k$k latents=data/latents_k$k
            python collect_rollouts.py --rollouts 400 --workers "$workers" --action-repeat "$k" --out-dir "$rollouts"
        fi
    fi
    python train_mdnrnn.py --ckpt-dir "$ckpt" --data-dir "$rollouts" --latent-dir "$latents" --epochs 30
fi
# 32 members x 4 shared tracks (lucid-dream-racer's budget; POP and ROLLOUTS change them); a training
# episode ends after 200 frames without a new tile. C holds each action for
# M's k frames (train_controller.py reads it from mdnrnn.pt). The CMA-ES mean
# is scored on 48 held-out tracks every 5 generations: 16 gave a standard
# error of about 39 points, and controller.pt was the luckiest of many.
python train_controller.py --ckpt-dir "$ckpt" --pop-size "$pop_size" --rollouts-per-member "$rollouts_per_member" --patience 200 "${race[@]}" \
    --reset-sigma "$reset_sigma" --eval-every 5 --eval-episodes "$held_out" --generations "$generations" --workers "$workers"
python evaluate.py --ckpt-dir "$ckpt" --episodes 100 --workers "$workers" --json "$ckpt/scores.json"
