#!/usr/bin/env bash
# Decide latency while World Agent runs stream: decide p99 at a steady open-loop rate, alone
# and while authoring runs are started and their event streams followed without pause, in the
# same run, against one `spectral serve` (API and workers runtimes in one process, as shipped).
#
# Usage: NICE=-20 bash bench/agent.sh   (about 2 minutes once built with the defaults)
#
# The model is `examples/standin_model.rs` on loopback: every call is answered by a streamed
# tool call, a chunk every BETWEEN_MS, so each run writes tens of token events to the store,
# which the stream reads back. Rows alternate, ROUNDS times, each DURATION s after WARMUP s:
#   alone:       decide (acme-payments / wire_transfer.release) open loop at RATE/s, c=CONNS
#   with agent:  the same while AGENTS clients each start a run on globex-support /
#                refund.issue, follow its event stream to the end, and start the next one
# then prints per-row medians over the rounds, and the agent's throughput.
#
# The server is pinned to CPU 0; the load generator, the stand-in model and the agent clients
# to CPU 1 (`taskset`, when there are two CPUs or more).
#
# Settings (environment), with defaults: DURATION=10 WARMUP=2 ROUNDS=3 RATE=2000 CONNS=8
# AGENTS=3 BETWEEN_MS=2 PORT=18084 MODEL_PORT=18094 BUILD=1 (0: use the built binaries)
# BACKGROUND_NICE (SPECTRAL_BACKGROUND_NICE for the server; its default when unset)
# FOLLOW=stream (or poll: clients poll each run's state every 200 ms and read its log once at
# the end, which separates the streams' cost from the runs')
# DB=sqlite (or postgres: a fresh database on PG_URL, default
# postgres://postgres@127.0.0.1:5432, created and dropped by the script; needs psql)
# NICE (e.g. -20: run in a session of its own at that autogroup nice, as bench/http.sh).
# Needs: cargo, curl, jq. Sends traffic to 127.0.0.1 only. Figures: bench/RESULTS.md.

set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${NICE:-}" ] && [ -z "${BENCH_SESSION:-}" ] && command -v setsid >/dev/null; then
    BENCH_SESSION=1 exec setsid -w bash bench/agent.sh "$@"
fi
PRIO=()
if [ -n "${NICE:-}" ]; then
    PRIO=(nice -n "$NICE")
    if [ -w /proc/self/autogroup ]; then
        echo "$NICE" >/proc/self/autogroup 2>/dev/null ||
            echo "bench/agent.sh: cannot set the autogroup nice; NICE has little effect" >&2
    fi
fi

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-2000}
CONNS=${CONNS:-8}
AGENTS=${AGENTS:-3}
BETWEEN_MS=${BETWEEN_MS:-2}
PORT=${PORT:-18084}
MODEL_PORT=${MODEL_PORT:-18094}
BUILD=${BUILD:-1}
DB=${DB:-sqlite}
FOLLOW=${FOLLOW:-stream}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
PG_DB=spectral_agent_bench_$$
# A fixed test key (never a real secret): the operator key of the throwaway store.
OPERATOR_KEY=spk_bench_operator_key_0123456789

for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "bench/agent.sh: needs $tool" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spectral-agent-bench.XXXXXX")
PIDS=()
cleanup() {
    local status=$?
    touch "$TMP/stop"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    [ "$DB" = postgres ] && psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $PG_DB" >/dev/null 2>&1
    rm -rf "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$BUILD" != 0 ] && cargo build --release --examples --bin spectral
BIN=target/release

SERVER_CPU=("${PRIO[@]}") CLIENT_CPU=("${PRIO[@]}")
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    SERVER_CPU+=(taskset -c 0) CLIENT_CPU+=(taskset -c 1)
fi

nice -n 19 "${CLIENT_CPU[@]}" "$BIN/examples/standin_model" --port "$MODEL_PORT" --between-ms "$BETWEEN_MS" \
    >"$TMP/model.log" 2>&1 &
PIDS+=($!)

if [ "$DB" = postgres ]; then
    psql -q "$PG_URL/postgres" -c "CREATE DATABASE $PG_DB" >/dev/null
fi
(
    unset DATABASE_URL
    [ "$DB" = postgres ] && export DATABASE_URL=$PG_URL/$PG_DB
    export SPECTRAL_ADDR=127.0.0.1:$PORT SPECTRAL_ADMIN_ADDR=127.0.0.1:0 \
        SPECTRAL_DATA_DIR=$TMP/data SPECTRAL_SEED_DIR=predicates \
        SPECTRAL_OPERATOR_KEY=$OPERATOR_KEY SPECTRAL_LOG=warn \
        SPECTRAL_AGENT_BASE_URL=http://127.0.0.1:$MODEL_PORT/v1 SPECTRAL_AGENT_MODEL=stand-in \
        SPECTRAL_AGENT_MAX_RUNS_PER_WORLD=$((AGENTS + 1)) SPECTRAL_RATE_LIMITS=off
    [ -n "${BACKGROUND_NICE:-}" ] && export SPECTRAL_BACKGROUND_NICE=$BACKGROUND_NICE
    exec "${SERVER_CPU[@]}" "$BIN/spectral" serve
) >"$TMP/spectral.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
BASE=http://127.0.0.1:$PORT
for _ in $(seq 300); do
    curl -fsS -o /dev/null "$BASE/health" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$TMP/spectral.log" >&2; exit 1; }
    sleep 0.1
done

AUTH="authorization: Bearer $OPERATOR_KEY"
echo '{"world":"acme-payments","action":"wire_transfer.release","context":{"amount":2500,"currency":"USD","payment_method":"ach","vendor_id":"v-17","vendor_status":"active","vendor_country":"DE","bank_account_changed_days":40,"approvals":["u-bob","u-cy"],"initiator":"u-ann","sanctions_hit":false}}' >"$TMP/decide.json"
code=$(curl -sS -o "$TMP/first.json" -w '%{http_code}' -H "$AUTH" -H 'content-type: application/json' \
    --data-binary "@$TMP/decide.json" "$BASE/api/decide")
[ "$code" = 200 ] || { echo "decide answered $code" >&2; cat "$TMP/first.json" >&2; exit 1; }

# One agent client: start a run, follow its stream to the end, again, until told to stop.
# Appends "<status> <events>" per finished run to its file.
agent_client() { # n
    local n=$1 run
    # Below the load generator on CPU 1 (with everything it starts: curl, jq), so that its
    # process starts do not delay the load generator's sends and the figures stay the server's.
    renice -n 19 -p "$BASHPID" >/dev/null
    while [ ! -e "$TMP/stop" ]; do
        run=$("${CLIENT_CPU[@]}" curl -sS -X POST -H "$AUTH" -H 'content-type: application/json' \
            --data '{"action":"refund.issue","text":"A refund to store credit of more than 500 EUR needs a person to look at it."}' \
            "$BASE/api/worlds/globex-support/agent/runs" | jq -r '.run // empty')
        if [ -z "$run" ]; then
            echo "refused 0" >>"$TMP/agent.$n"
            continue
        fi
        if [ "$FOLLOW" = stream ]; then
            "${CLIENT_CPU[@]}" curl -sSN -H "$AUTH" "$BASE/api/worlds/globex-support/agent/runs/$run/events" >"$TMP/stream.$n"
        else
            # Poll the run's state instead of following its stream: separates the cost of the
            # streams from that of the runs.
            while "${CLIENT_CPU[@]}" curl -sS -H "$AUTH" "$BASE/api/worlds/globex-support/agent/runs/$run" |
                jq -e '.status == "running"' >/dev/null; do
                sleep 0.2
            done
            "${CLIENT_CPU[@]}" curl -sS -H "$AUTH" "$BASE/api/worlds/globex-support/agent/runs/$run/events" \
                -H 'last-event-id: 0' >"$TMP/stream.$n"
        fi
        local events status
        events=$(grep -c '^id: ' "$TMP/stream.$n" || true)
        status=$(grep '^data: ' "$TMP/stream.$n" | tail -n 1 | sed 's/^data: //' | jq -r '.data.status // "?"' 2>/dev/null || echo '?')
        echo "$status $events" >>"$TMP/agent.$n"
    done
}

loadgen() { # label -> JSON line
    "${CLIENT_CPU[@]}" "$BIN/examples/loadgen" --url "$BASE/api/decide" -X POST \
        --body-file "$TMP/decide.json" -H "$AUTH" -H 'content-type: application/json' \
        -c "$CONNS" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" --label "$1"
}

: >"$TMP/alone.jsonl"
: >"$TMP/agent.jsonl"
AGENT_SECONDS=0
for round in $(seq "$ROUNDS"); do
    loadgen alone >>"$TMP/alone.jsonl"
    rm -f "$TMP/stop" "$TMP"/agent.*
    clients=()
    for n in $(seq "$AGENTS"); do
        agent_client "$n" &
        clients+=($!)
    done
    PIDS+=("${clients[@]}")
    line=$(loadgen with-agent)
    touch "$TMP/stop"
    for pid in "${clients[@]}"; do wait "$pid" 2>/dev/null || true; done
    runs=$(cat "$TMP"/agent.* 2>/dev/null | grep -vc '^refused' || true)
    proposed=$(cat "$TMP"/agent.* 2>/dev/null | grep -c '^proposed' || true)
    refused=$(cat "$TMP"/agent.* 2>/dev/null | grep -c '^refused' || true)
    events=$(cat "$TMP"/agent.* 2>/dev/null | awk '{s += $2} END {print s + 0}')
    echo "$line" | jq -c --argjson runs "$runs" --argjson proposed "$proposed" \
        --argjson refused "$refused" --argjson events "$events" \
        '. + {agent_runs: $runs, agent_proposed: $proposed, agent_refused: $refused, agent_events: $events}' \
        >>"$TMP/agent.jsonl"
    echo "round $round: alone p99 $(tail -n 1 "$TMP/alone.jsonl" | jq .latency_us.p99) µs;" \
        "with agent p99 $(tail -n 1 "$TMP/agent.jsonl" | jq .latency_us.p99) µs," \
        "$runs runs ($proposed proposed), $events events" >&2
done

median() { # file jq-path
    jq -s "[.[] | $2] | sort | .[(length - 1) / 2 | floor]" "$1"
}
echo
echo "backend: $DB; decide at $RATE/s open loop, c=$CONNS; $AGENTS agent clients; $ROUNDS rounds of ${DURATION} s"
echo "| row | decide req/s | p50 | p90 | p99 | p99.9 | decide non-2xx | agent runs (proposed) | agent events |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for row in alone agent; do
    f=$TMP/$row.jsonl
    label="decide at $RATE/s alone"
    agent_cols="| — | — |"
    if [ "$row" = agent ]; then
        label="decide at $RATE/s, $AGENTS agent runs streaming"
        agent_cols="| $(median "$f" .agent_runs) ($(median "$f" .agent_proposed)) per ${DURATION}+ s | $(median "$f" .agent_events) |"
    fi
    echo "| $label | $(median "$f" .rps) | $(median "$f" .latency_us.p50) µs | $(median "$f" .latency_us.p90) µs | $(median "$f" .latency_us.p99) µs | $(median "$f" .latency_us.p999) µs | $(median "$f" .non_2xx) $agent_cols"
done
echo
echo "per round (alone, then with agent):"
paste -d' ' <(jq -c '[.latency_us.p99]' "$TMP/alone.jsonl") <(jq -c '[.latency_us.p99, .agent_runs, .agent_events]' "$TMP/agent.jsonl")
