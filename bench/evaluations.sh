#!/usr/bin/env bash
# Instructions per decision of the largest action of every example world, counted by
# callgrind, so that two builds can be compared on a busy machine: counts do not depend on
# load. Prints one line per world: instructions of one evaluation, set-up subtracted.
#
#   bash bench/evaluations.sh            # N=2000 evaluations per world
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-2000}"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --quiet --release --example evaluations
bin="${CARGO_TARGET_DIR:-target}/release/examples/evaluations"
instructions() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 \
        | sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}
for dir in predicates/*/; do
    world="$(basename "$dir")"
    [ -f "$dir/world.toml" ] || continue
    base="$(instructions "$world" 0)"
    full="$(instructions "$world" "$N")"
    echo "$world: $(( (full - base) / N )) instructions per decision"
done
