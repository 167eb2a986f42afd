#!/usr/bin/env bash
# A GPU machine, one call: the suite with CUDA visible (in the
# background, beside the GPU benches), bench/speed.py on the GPU, bench/speed.py agent on 16
# workers, and one real CMA-ES generation of 64 x 16 on 2, 4, 8 and 16 workers.
# usage: OUT=results/ bash bench/gpu.sh   (docs/performance.md, "A GPU machine")
set -uo pipefail
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
# A GPU machine without a package index installs from wheels carried in .device-wheels/, if there are any.
[ -d .device-wheels ] && python3 -m pip install -q --no-deps --no-index .device-wheels/*.whl 2>&1 | grep -v WARNING
export SDL_VIDEODRIVER=dummy PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
: "${OUT:?set OUT to the folder for the results}"; mkdir -p "$OUT"
B=$OUT/bench.jsonl
{ nproc; lscpu | grep "Model name"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print(torch.__version__)"; } | tee "$OUT/machine.txt"
( timeout "${PT_S:-300}" python3 -m pytest -q -p no:cacheprovider -rs --ignore tests/test_ray.py tests \
    > "$OUT/pytest.log" 2>&1; echo "pytest rc=$? after $(( $(date +%s) - t0 )) s" >> "$OUT/pytest.log" ) &
scale() {  # one real CMA-ES generation of 64 x 16, episodes cut at SCALE_STEPS frames, on $1 workers
  d=/tmp/scale$1; mkdir -p $d; cp checkpoints/pretrained/vae.pt checkpoints/pretrained/mdnrnn.pt $d/
  el "scale $1 workers"
  timeout "${ST:-150}" python3 train_controller.py --ckpt-dir $d --pop-size 64 --rollouts-per-member 16 \
      --generations 1 --max-steps "${SCALE_STEPS:-60}" --eval-every 1000 --workers "$1" 2>/dev/null \
      | grep -a "^generation\|^C:" >> "$OUT/scale.log"
  el "scale $1 done"
}
# 4 and 2 workers run beside the suite (2 cores) and the GPU benches (1 core): 6-9 of 16 cores busy.
( for w in ${SCALE_LOW:-4 2}; do scale $w; done ) &
b() { el "bench $*"; echo "{\"args\": \"$*\"}" >> "$B"; timeout "${BT:-90}" python3 -m bench.speed "$@" --json >> "$B" 2>> "$OUT/bench.err"; }
b vae --device cuda --rounds 7
b vae --device cuda --batch-size 1000 --rounds 7
b mdnrnn --device cuda
b mdnrnn --device cuda --batch-size 256
b dream --device cuda
b dream --device cuda --pop-size 256
b env --steps 300
wait; el "pytest done"; tail -3 "$OUT/pytest.log"
BT=${AT:-150} b agent --workers 16 --rounds 2
for w in ${SCALE_HIGH:-16 8}; do scale $w; done
cat "$OUT/scale.log"; cat "$B"; ls -la "$OUT"
