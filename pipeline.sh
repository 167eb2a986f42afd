#!/usr/bin/env bash
# The whole pipeline at the repository's default scale, stage after stage.
# Every stage resumes where it stopped, so rerunning this after an
# interruption continues rather than starting over. Extra flags go to every
# stage's --config, e.g. `bash pipeline.sh config/tiny.json`.
set -euo pipefail
cd "$(dirname "$0")"
export SDL_VIDEODRIVER=${SDL_VIDEODRIVER:-dummy}
python collect_rollouts.py
