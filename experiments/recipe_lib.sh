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
