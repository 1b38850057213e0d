#!/usr/bin/env bash
# Where the server's CPU goes, per request and per thread: `spectral serve` pinned to CPU 0 on
# a throwaway SQLite store, driven by examples/loadgen.rs on CPU 1, with each thread's CPU
# time (utime + stime from /proc, summed by thread name) divided by the requests served.
# Shows the decide path next to `GET /version` (the same server and HTTP stack, no
# authentication, evaluation or decision record), closed loop and at a fixed rate.
#
# Usage: bash bench/threads.sh     (about 1 minute once built)
# With SHADOW=variant or SHADOW=hostile (bench/shadows.sh), two more rows follow on the same
# server with that shadow started at sample 1.0: decide closed and at RATE/s, where the
# evaluator's own thread (spectral-shadow) shows beside the API's.
# Settings (environment), with defaults: DURATION=8 WARMUP=1 CONNS=32 RATE=3000, SHADOW=,
# SPECTRAL_PORT=18083, BUILD=1 (0: use the binaries already built), NICE= (e.g. -20).
# Other SPECTRAL_* variables pass through to the server. Needs: cargo, curl, jq, taskset.
# Figures: bench/RESULTS.md.

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-32}
RATE=${RATE:-3000}
PORT=${SPECTRAL_PORT:-18083}
BUILD=${BUILD:-1}
# A fixed test key (never a real secret): the operator key of the throwaway store.
KEY=spk_bench_operator_key_0123456789

for tool in curl jq taskset; do
    command -v "$tool" >/dev/null || { echo "bench/threads.sh: needs $tool" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "bench/threads.sh: needs 2 CPUs" >&2; exit 1; }
if [ "$BUILD" != 0 ]; then
    cargo build --release --examples --bin spectral
fi
BIN=target/release
PRIO=()
[ -n "${NICE:-}" ] && PRIO=(nice -n "$NICE")

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spectral-threads-bench.XXXXXX")
SERVER_PID=
cleanup() {
    local status=$?
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

(
    unset DATABASE_URL
    export SPECTRAL_ADDR=127.0.0.1:$PORT SPECTRAL_DATA_DIR=$TMP/data \
        SPECTRAL_SEED_DIR=predicates SPECTRAL_OPERATOR_KEY=$KEY SPECTRAL_LOG=warn
    exec "${PRIO[@]}" taskset -c 0 "$BIN/spectral" serve
) >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 300); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/server.log" >&2; exit 1; }
    sleep 0.1
done

cat >"$TMP/decide.json" <<'JSON'
{"world":"acme-payments","action":"wire_transfer.release","context":{"amount":25000,"currency":"USD","payment_method":"wire","vendor_id":"v-17","vendor_status":"active","vendor_country":"DE","bank_account_changed_days":40,"approvals":["u-bob","u-cy"],"initiator":"u-ann","sanctions_hit":false}}
JSON

ticks() { # "thread-name ticks" per thread name, summed
    local t stat name
    for t in /proc/"$SERVER_PID"/task/*; do
        stat=$(<"$t/stat") name=$(<"$t/comm")
        stat=${stat##*) }
        # shellcheck disable=SC2086
        set -- $stat
        echo "$name $((${12} + ${13}))"
    done | awk '{ a[$1] += $2 } END { for (k in a) print k, a[k] }' | sort
}
HZ=$(getconf CLK_TCK)

run() { # label method path [rate]
    local label=$1 method=$2 path=$3 rate=${4:-} args
    args=(--url "http://127.0.0.1:$PORT$path" -X "$method" -H "authorization: Bearer $KEY"
        -c "$CONNS" --duration "$DURATION" --warmup "$WARMUP" --label "$label")
    if [ "$method" = POST ]; then
        args+=(--body-file "$TMP/decide.json" -H 'content-type: application/json')
    fi
    [ -n "$rate" ] && args+=(--rate "$rate")
    ticks >"$TMP/t0"
    "${PRIO[@]}" taskset -c 1 "$BIN/examples/loadgen" "${args[@]}" >"$TMP/line.json"
    sleep 0.5 # the decision log's last batch of the row
    ticks >"$TMP/t1"
    # Requests over the whole run, warm-up included, since the ticks cover it too.
    local n
    n=$(jq --argjson w "$WARMUP" --argjson d "$DURATION" '.rps * ($w + $d) | floor' "$TMP/line.json")
    printf '%-22s %8s req/s  p50 %7s µs  p99 %8s µs  CPU per request: ' "$label" \
        "$(jq -r .rps "$TMP/line.json")" "$(jq -r .latency_us.p50 "$TMP/line.json")" \
        "$(jq -r .latency_us.p99 "$TMP/line.json")"
    join "$TMP/t0" "$TMP/t1" | awk -v n="$n" -v hz="$HZ" '{
        d = $3 - $2; t += d
        if (d > 0) printf "%s %.1f µs, ", $1, d * 1e6 / hz / n
    } END { printf "total %.1f µs\n", t * 1e6 / hz / n }'
}

echo "spectral serve on CPU 0, loadgen on CPU 1, c=$CONNS, ${WARMUP}s + ${DURATION}s per row"
run "version closed" GET /version
run "decide closed" POST /api/decide
run "version at $RATE/s" GET /version "$RATE"
run "decide at $RATE/s" POST /api/decide "$RATE"
if [ -n "${SHADOW:-}" ]; then
    API=http://127.0.0.1:$PORT/api/worlds/acme-payments AUTH="authorization: Bearer $KEY"
    # shellcheck source=bench/shadows.sh
    . bench/shadows.sh
    version=$(publish_shadow "$SHADOW")
    api POST /shadow "{\"version\": $version, \"sample\": 1.0}" >/dev/null
    run "decide closed, $SHADOW shadow" POST /api/decide
    run "decide at $RATE/s, $SHADOW shadow" POST /api/decide "$RATE"
    echo "shadow report: $(api GET /shadow | jq -c '.report | {evaluated, skipped, differing}')"
fi
echo "decision log (/health): $(curl -fsS "http://127.0.0.1:$PORT/health" | jq -c .features.decision_log)"
