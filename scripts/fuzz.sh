#!/usr/bin/env bash
# The bounded fuzz run of the test command: builds the coverage-guided targets of fuzz/
# (cargo-fuzz, libFuzzer), runs each for FUZZ_SECONDS on a scratch copy of its seed corpus
# (fuzz/seeds/<target>, never written to), and fails on any crash, leak, timeout or
# out-of-memory. Prints per target the executions, libFuzzer's coverage (cov: edges,
# ft: features) and the time.
#
#   bash scripts/fuzz.sh                      # every target, FUZZ_SECONDS (30) each
#   FUZZ_SECONDS=300 bash scripts/fuzz.sh predicate
#
# With a nightly toolchain the targets are built with AddressSanitizer; without one they
# are built on stable with `--sanitizer none` (panics and invariants only), and the run says
# so. A crash's input is kept under the scratch folder, printed at the end; reproduce it with
# `fuzz/target/x86_64-unknown-linux-gnu/release/<target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_RSS_MB="${FUZZ_RSS_MB:-2048}"
# Seconds one input may take before libFuzzer calls it a hang.
FUZZ_TIMEOUT="${FUZZ_TIMEOUT:-10}"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(decide_body draft_world world_toml predicate)
fi

if [ "$FUZZ_SECONDS" = 0 ]; then
    echo "fuzz: FUZZ_SECONDS=0, NOT FUZZING: no target was run" >&2
    exit 0
fi

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
    sanitizer=address
else
    toolchain=()
    sanitizer=none
    echo "##################################################################################" >&2
    echo "fuzz: NO NIGHTLY TOOLCHAIN: building on stable with --sanitizer none." >&2
    echo "fuzz: panics and the targets' invariants are checked, memory errors are NOT" >&2
    echo "fuzz: (rustup toolchain install nightly for AddressSanitizer)." >&2
    echo "##################################################################################" >&2
fi

# The lock file is the fuzz crate's own and is committed: refuse to run on another.
cargo "${toolchain[@]}" fetch --locked --manifest-path fuzz/Cargo.toml --quiet

# Release with debug assertions: overflow checks and `debug_assert!`s count as crashes.
echo "fuzz: building ${targets[*]} (sanitizer: $sanitizer)"
for target in "${targets[@]}"; do
    cargo "${toolchain[@]}" fuzz build --fuzz-dir fuzz -O -a -s "$sanitizer" "$target"
done
bin="fuzz/target/x86_64-unknown-linux-gnu/release"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/spectral-fuzz.XXXXXX")"
failed=()
rows=()
for target in "${targets[@]}"; do
    corpus="$scratch/corpus/$target"
    artifacts="$scratch/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    cp fuzz/seeds/"$target"/* "$corpus"/
    seeds="$(find "$corpus" -type f | wc -l)"
    log="$scratch/$target.log"
    echo "fuzz: $target for ${FUZZ_SECONDS}s from $seeds seeds"
    started="$(date +%s)"
    status=0
    # ASan's leak check stays on: a leak per input is a crash too.
    "$bin/$target" "$corpus" \
        -max_total_time="$FUZZ_SECONDS" \
        -rss_limit_mb="$FUZZ_RSS_MB" \
        -timeout="$FUZZ_TIMEOUT" \
        -artifact_prefix="$artifacts/" \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    took=$(( $(date +%s) - started ))
    # libFuzzer's last status line: "#EXECS DONE cov: N ft: N corp: ... exec/s: N rss: N".
    last="$(grep -E '^#[0-9]+' "$log" | tail -n1 || true)"
    execs="$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n1)"
    execs="${execs:-$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")}"
    cov="$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")"
    ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")"
    corp="$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")"
    crashes="$(find "$artifacts" -type f | wc -l)"
    rows+=("$(printf '%-12s %10s %6s %7s %6s %5ss %8s' "$target" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$took" "$crashes")")
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ] || [ -z "$last" ]; then
        failed+=("$target")
        echo "fuzz: $target FAILED (exit $status, $crashes crash file(s)); the end of its log:" >&2
        tail -n 40 "$log" >&2
        find "$artifacts" -type f -exec echo "fuzz: crashing input: {}" \; >&2
    fi
done

echo
echo "fuzz: sanitizer $sanitizer, ${FUZZ_SECONDS}s a target"
printf '%-12s %10s %6s %7s %6s %6s %8s\n' target execs cov ft corpus time crashes
printf '%s\n' "${rows[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (logs and inputs under $scratch)" >&2
    exit 1
fi
rm -rf "$scratch"
echo "fuzz: ${#targets[@]} target(s), 0 crashes"
