#!/usr/bin/env bash
# Noisy neighbours: world B's decide latency at a steady open-loop rate, alone and while
# world A floods the same server past its per-world rate limit, then the same with rate limits
# off (the control: what the flood costs B when nothing bounds it).
#
# Usage: bash bench/neighbours.sh   (about 90 s once built)
#
# Both worlds are copies of the `acme-payments` example (B is renamed `acme-neighbour`), so a
# request costs the same in either; each is asked with a key bound to it (made with
# `spectral keys create`), and the per-key limit is set out of reach, so A's flood meets its
# world's limit. Rows, each DURATION s after
# WARMUP s of uncounted traffic, on `spectral serve` with its SQLite store in TMPDIR:
#   1. B alone        open loop at B_RATE/s, c=B_CONNS
#   2. B + A flood    the same, while A runs closed loop with c=A_CONNS, limited to A_LIMIT/s
# then rows 1 and 2 again with SPECTRAL_RATE_LIMITS=off.
#
# Settings (environment), with defaults: DURATION=10 WARMUP=2 B_RATE=1000 B_CONNS=8
# A_CONNS=32 A_LIMIT=1000 PORT=18083 BUILD=1 (0: use the binaries already built),
# PROFILE=release (debug: the unoptimized build, for a quick look; its figures are not the
# recorded ones).
# Needs: cargo, curl, jq. Sends traffic to 127.0.0.1 only. Figures: bench/RESULTS.md.

set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
B_RATE=${B_RATE:-1000}
B_CONNS=${B_CONNS:-8}
A_CONNS=${A_CONNS:-32}
A_LIMIT=${A_LIMIT:-1000}
PORT=${PORT:-18083}
BUILD=${BUILD:-1}
PROFILE=${PROFILE:-release}
# A fixed test key (never a real secret): the operator key of the throwaway store.
OPERATOR_KEY=spk_bench_operator_key_0123456789

for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "bench/neighbours.sh: needs $tool" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spectral-neighbours.XXXXXX")
PIDS=()
cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$BUILD" != 0 ]; then
    if [ "$PROFILE" = release ]; then
        cargo build --release --examples --bin spectral
    else
        cargo build --examples --bin spectral
    fi
fi
BIN=target/$PROFILE

# The two worlds.
mkdir -p "$TMP/worlds"
cp -r predicates/acme-payments "$TMP/worlds/acme-payments"
cp -r predicates/acme-payments "$TMP/worlds/acme-neighbour"
sed -i 's/^world = "acme-payments"/world = "acme-neighbour"/' "$TMP/worlds/acme-neighbour/world.toml"

body() { # world -> a GREEN wire release of that world
    echo "{\"world\":\"$1\",\"action\":\"wire_transfer.release\",\"context\":{\"amount\":2500,\"currency\":\"USD\",\"payment_method\":\"ach\",\"vendor_id\":\"v-17\",\"vendor_status\":\"active\",\"vendor_country\":\"DE\",\"bank_account_changed_days\":40,\"approvals\":[\"u-bob\",\"u-cy\"],\"initiator\":\"u-ann\",\"sanctions_hit\":false}}"
}
body acme-payments >"$TMP/a.json"
body acme-neighbour >"$TMP/b.json"
URL=http://127.0.0.1:$PORT/api/decide

SERVER_PID=
start_server() { # limits: on|off
    rm -rf "$TMP/data"
    (
        unset DATABASE_URL
        export SPECTRAL_ADDR=127.0.0.1:$PORT SPECTRAL_ADMIN_ADDR=127.0.0.1:0 \
            SPECTRAL_DATA_DIR=$TMP/data SPECTRAL_SEED_DIR=$TMP/worlds \
            SPECTRAL_OPERATOR_KEY=$OPERATOR_KEY SPECTRAL_LOG=warn \
            SPECTRAL_RATE_LIMITS=$1 SPECTRAL_RATE_DECIDE_PER_WORLD=$A_LIMIT \
            SPECTRAL_RATE_DECIDE_PER_KEY=100000000 SPECTRAL_RATE_BURST_SECONDS=1
        exec "$BIN/spectral" serve
    ) >"$TMP/spectral.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$TMP/spectral.log" >&2; exit 1; }
        sleep 0.1
    done
    for w in a b; do
        local world=acme-payments
        [ "$w" = b ] && world=acme-neighbour
        local key
        key=$(SPECTRAL_DATA_DIR=$TMP/data "$BIN/spectral" keys create --world "$world" 2>/dev/null | head -n 1)
        echo "authorization: Bearer $key" >"$TMP/$w.auth"
        code=$(curl -sS -o "$TMP/first.json" -w '%{http_code}' -H "$(cat "$TMP/$w.auth")" \
            -H 'content-type: application/json' --data-binary "@$TMP/$w.json" "$URL")
        [ "$code" = 200 ] || { echo "decide on world $w answered $code" >&2; cat "$TMP/first.json" >&2; exit 1; }
    done
}
stop_server() {
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
}

loadgen() { # label world(a|b) conns [rate] -> JSON line
    local args=(--url "$URL" -X POST --body-file "$TMP/$2.json" -H "$(cat "$TMP/$2.auth")"
        -H 'content-type: application/json' -c "$3"
        --duration "$DURATION" --warmup "$WARMUP" --label "$1")
    [ -n "${4:-}" ] && args+=(--rate "$4")
    "$BIN/examples/loadgen" "${args[@]}"
}

row() { # limits label line
    echo "$3" | jq -r --arg limits "$1" --arg row "$2" \
        '"| \($row) | \($limits) | \(.rps) | \(.latency_us.p50) µs | \(.latency_us.p99) µs | \(.latency_us.p999) µs | \(.non_2xx) |"'
}

echo "| row | rate limits | world B req/s | B p50 | B p99 | B p99.9 | B non-2xx |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for limits in on off; do
    start_server "$limits"
    alone=$(loadgen b-alone b "$B_CONNS" "$B_RATE")
    row "$limits" "B alone at $B_RATE/s" "$alone"
    loadgen a-flood a "$A_CONNS" >"$TMP/flood.json" &
    FLOOD_PID=$!
    flooded=$(loadgen b-flooded b "$B_CONNS" "$B_RATE")
    wait "$FLOOD_PID"
    row "$limits" "B at $B_RATE/s while A floods (c=$A_CONNS)" "$flooded"
    jq -r --arg limits "$limits" \
        '"|   A, the flood | \($limits) | \(.rps) (\(.status["200"] // 0) answered 200, \(.status["429"] // 0) 429) | \(.latency_us.p50) µs | \(.latency_us.p99) µs | \(.latency_us.p999) µs | \(.non_2xx) |"' \
        "$TMP/flood.json"
    stop_server
done
