# What the dream recipes share (experiments/dream_recipe.sh and
# experiments/dream_gas_cost.sh), sourced by them: they read $py (the
# interpreter) and $out (the recipe's folder).

# link FILE FOLDER: FOLDER/FILE's name -> FILE, relative, so the folders can move
link() {
    mkdir -p "$2" && ln -sfn "$(realpath --relative-to="$2" "$1")" "$2/$(basename "$1")"
}

# best FILES...: the one whose held-out score is the highest (a controller.pt's
# held_out, or an evaluate.py JSON's mean)
best() {
    "$py" - "$@" <<'EOF'
import json, sys
from wm.checkpoint import load_checkpoint
def held_out(path):
    return json.load(open(path))["mean"] if path.endswith(".json") else load_checkpoint(path, "controller")["held_out"]
print(max(sys.argv[1:], key=held_out))
EOF
}

# pin WHAT PICK [MORE...]: the steps after a pick are made from it once; the
# first run records "PICK MORE..." in OUT/picked_WHAT, a rerun reads it back.
# Prints MORE as first recorded; a rerun that picks otherwise stops here.
pin() {
    local file=$out/picked_$1 was rest
    [ -f "$file" ] || echo "${*:2}" > "$file"
    read -r was rest < "$file"
    [ "$was" = "$2" ] || {
        echo "error: the $1 picked is now $2, but the steps after it in $out were made from $was;" \
            "give a new OUT and DATA to run them from $2" >&2
        exit 2
    }
    echo "$rest"
}

# scale_and_score RUN PREFIX: RUN's C times 0.9 and 1.1 (in OUT/PREFIX0.9 and
# OUT/PREFIX1.1), each scored on the held-out tracks; the best of the three,
# C itself among them, is $pick, scored over $episodes episodes on tracks
# 0-99 and 400-499 (scores.json, scores_unseen.json there). Reads $held_out,
# $workers and $max_steps too.
scale_and_score() {
    local run=$1 prefix=$2 scale d seed json
    for scale in 0.9 1.1; do
        d=$out/$prefix$scale
        [ -f "$d/controller.pt" ] || "$py" -m tools.scale_controller --ckpt-dir "$run" --scale $scale --out-dir "$d"
        [ -f "$d/held_out.json" ] || "$py" evaluate.py --ckpt-dir "$d" --episodes "$held_out" --seed 100000 \
            --workers "$workers" --max-steps "$max_steps" --json "$d/held_out.json"
    done
    pick=$(dirname "$(best "$run/controller.pt" "$out/${prefix}0.9/held_out.json" "$out/${prefix}1.1/held_out.json")")
    echo "picked $pick"
    for seed in 0 400; do
        json=$pick/scores$([ $seed = 0 ] || echo _unseen).json
        [ -f "$json" ] || "$py" evaluate.py --ckpt-dir "$pick" --episodes "$episodes" --seed $seed \
            --workers "$workers" --max-steps "$max_steps" --json "$json"
    done
}
