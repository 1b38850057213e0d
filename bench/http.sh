#!/usr/bin/env bash
# The HTTP benchmark: `POST /api/decide` on `spectral serve` next to a raw hyper hello-world
# (examples/hello.rs), both driven by the same client (examples/loadgen.rs) in the same run,
# with the summary table and the checks of the two HTTP targets.
#
# Usage: bash bench/http.sh     (about 130 s once built, 80 s with SHADOWS=; NICE=-20 RUNS=3 for the recorded figures)
#
# Sequence (servers pinned to CPU 0, the load generator to CPU 1, when taskset exists and
# there are at least 2 CPUs; keep-alive; every run has WARMUP s of uncounted traffic first):
#   1. hello   closed loop, c=CONNS           (the HTTP ceiling)
#   2. decide  closed loop, c=CONNS           (max decide rate)
#      then the peers' 1-rule world, closed loop, c=CONNS (published by the script as
#      `peers`: the predicate and context of research/peers.md)
#   3. decide  open loop at HALF × (2), c=CONNS, latency from each request's due time
#   4. hello   open loop at the same rate     (the client's and machine's own tail, a control)
#   5. hello   closed loop, c=1
#   6. decide  closed loop, c=1
#   7. per shadow kind in SHADOWS (docs/impact.md), with that shadow started at SAMPLE:
#      decide closed loop, c=CONNS, and decide open loop at the rate of (3)
# then /health's decision_log counters. With RUNS=n the sequence runs n times against the
# same servers and a table of per-row medians follows the per-run tables.
#
# Settings (environment), with defaults: DURATION=10 WARMUP=2 (seconds per row), CONNS=32,
# HALF=0.5 (open-loop rate as a fraction of the closed-loop decide rate), RUNS=1,
# SHADOWS="variant hostile" (empty: no shadow rows; the kinds are described in
# bench/shadows.sh),
# SAMPLE=1.0 (the shadows' sampled share), HELLO_PORT=18081, SPECTRAL_PORT=18082,
# PIN=auto (0: no pinning), NICE= (e.g. -20: higher
# priority on a shared machine), BUILD=1 (0: use the binaries already built), BENCH_OUT=
# (a directory that keeps the raw JSON lines and the server logs). TMPDIR decides where the
# throwaway SQLite store lives (/tmp by default; /dev/shm takes the disk out of the picture).
# Other SPECTRAL_* variables (e.g. SPECTRAL_DECISION_LOG_OVERFLOW) pass through to the server.
# Needs: cargo, curl, jq. Sends traffic to 127.0.0.1 only. Figures: bench/RESULTS.md.

set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NICE:-}" ] && [ -z "${BENCH_SESSION:-}" ] && command -v setsid >/dev/null; then
    BENCH_SESSION=1 exec setsid -w bash bench/http.sh "$@"
fi

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-32}
HALF=${HALF:-0.5}
RUNS=${RUNS:-1}
SHADOWS=${SHADOWS-variant hostile}
SAMPLE=${SAMPLE:-1.0}
HELLO_PORT=${HELLO_PORT:-18081}
SPECTRAL_PORT=${SPECTRAL_PORT:-18082}
PIN=${PIN:-auto}
BUILD=${BUILD:-1}
# A fixed test key (never a real secret): the operator key of the throwaway store.
OPERATOR_KEY=spk_bench_operator_key_0123456789

for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "bench/http.sh: needs $tool" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spectral-http-bench.XXXXXX")
OUT=${BENCH_OUT:-$TMP}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
PIDS=()
LOADGEN_PID=

cleanup() {
    local status=$?
    [ -n "$LOADGEN_PID" ] && kill "$LOADGEN_PID" 2>/dev/null || true
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
    cargo build --release --examples --bin spectral
fi
BIN=target/release

# NICE=-15 (as root) runs the servers and the load generator at a higher priority, so that
# other work on a shared machine disturbs the figures less; it applies to both servers alike.
# With the kernel's autogroups on, priority is shared per session: the script then runs in a
# session of its own (setsid, started at the top) and sets that session's autogroup nice.
PRIO=()
if [ -n "${NICE:-}" ]; then
    PRIO=(nice -n "$NICE")
    if [ -w /proc/self/autogroup ]; then
        echo "$NICE" >/proc/self/autogroup 2>/dev/null ||
            echo "bench/http.sh: cannot set the autogroup nice; NICE has little effect" >&2
    fi
fi
SERVER_PIN=("${PRIO[@]}")
CLIENT_PIN=("${PRIO[@]}")
CPUS=$(nproc)
if [ "$PIN" != 0 ] && command -v taskset >/dev/null && [ "$CPUS" -ge 2 ]; then
    SERVER_PIN+=(taskset -c 0)
    CLIENT_PIN+=(taskset -c 1)
    PINNING="servers on CPU 0, load generator on CPU 1"
else
    PINNING="not pinned"
fi

for port in "$HELLO_PORT" "$SPECTRAL_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "bench/http.sh: something already listens on 127.0.0.1:$port" >&2
        exit 1
    fi
done

# The servers: `exec` so that the recorded pid is the server process itself.
(exec "${SERVER_PIN[@]}" "$BIN/examples/hello" "127.0.0.1:$HELLO_PORT") >"$OUT/hello.log" 2>&1 &
HELLO_PID=$!
PIDS+=("$HELLO_PID")
(
    unset DATABASE_URL
    export SPECTRAL_ADDR=127.0.0.1:$SPECTRAL_PORT SPECTRAL_DATA_DIR=$TMP/data \
        SPECTRAL_SEED_DIR=predicates SPECTRAL_OPERATOR_KEY=$OPERATOR_KEY SPECTRAL_LOG=warn
    exec "${SERVER_PIN[@]}" "$BIN/spectral" serve
) >"$OUT/spectral.log" 2>&1 &
SPECTRAL_PID=$!
PIDS+=("$SPECTRAL_PID")

wait_up() { # url pid name
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench/http.sh: $3 did not come up ($1); its log:" >&2
    tail -n 30 "$OUT/$3.log" >&2
    exit 1
}
wait_up "http://127.0.0.1:$HELLO_PORT/" "$HELLO_PID" hello
wait_up "http://127.0.0.1:$SPECTRAL_PORT/health" "$SPECTRAL_PID" spectral

BODY=$TMP/decide.json
cat >"$BODY" <<'EOF'
{"world":"acme-payments","action":"wire_transfer.release","context":{"amount":25000,"currency":"USD","payment_method":"wire","vendor_id":"v-17","vendor_status":"active","vendor_country":"DE","bank_account_changed_days":40,"approvals":["u-bob","u-cy"],"initiator":"u-ann","sanctions_hit":false}}
EOF
AUTH="authorization: Bearer $OPERATOR_KEY"
DECIDE_URL=http://127.0.0.1:$SPECTRAL_PORT/api/decide
# The hello server gets the very same request bytes: path, headers and body.
HELLO_URL=http://127.0.0.1:$HELLO_PORT/api/decide

# One decision first, so that a broken setup fails here and not as a column of errors.
code=$(curl -sS -o "$TMP/first.json" -w '%{http_code}' -H "$AUTH" \
    -H 'content-type: application/json' --data-binary "@$BODY" "$DECIDE_URL")
if [ "$code" != 200 ]; then
    echo "bench/http.sh: decide answered $code:" >&2
    cat "$TMP/first.json" >&2
    exit 1
fi
echo "decide answers 200, status $(jq -r .status "$TMP/first.json")"

# The peers' 1-rule workload, as a world of its own published and deployed through the API.
PEERS_BODY=$TMP/peers.json
cat >"$PEERS_BODY" <<'EOF'
{"world":"peers","action":"purchase","context":{"user":{"id":"u1","tier":"gold","country":"US"},"amount":250,"action":"purchase","tags":["a","b"]}}
EOF
PEERS_MODEL='{"world": "peers", "description": "The peers benchmark workload.",
  "context": {"amount": {"type": "number"}, "user": {"type": "object", "fields": {
    "id": {"type": "string"}, "tier": {"type": "string"}, "country": {"type": "string"}}}},
  "actions": [{"name": "purchase", "rules": [{"id": "gold-us-small",
    "text": "Small purchases by gold users in the US.", "severity": "T2", "outcome": "GREEN",
    "inputs": ["amount", "user"],
    "predicate": "context.amount < 1000 && context.user.country == \"US\" && context.user.tier == \"gold\"",
    "cases": [{"context": {"amount": 250, "user": {"id": "u1", "tier": "gold", "country": "US"}}, "matches": true}]}]}]}'
peers_api() { # METHOD PATH [JSON BODY]
    local args=(-fsS -X "$1" -H "$AUTH" "http://127.0.0.1:$SPECTRAL_PORT/api/worlds/peers$2")
    [ $# -gt 2 ] && args+=(-H 'content-type: application/json' --data-binary "$3")
    curl "${args[@]}"
}
peers_api PUT /draft "$PEERS_MODEL" >/dev/null
peers_version=$(peers_api POST /versions '{}' | jq -e .version)
peers_api POST /deployments "{\"version\": $peers_version}" >/dev/null
code=$(curl -sS -o "$TMP/first.json" -w '%{http_code}' -H "$AUTH" \
    -H 'content-type: application/json' --data-binary "@$PEERS_BODY" "$DECIDE_URL")
if [ "$code" != 200 ]; then
    echo "bench/http.sh: the peers' world answered $code:" >&2
    cat "$TMP/first.json" >&2
    exit 1
fi
echo "the peers' 1-rule world answers 200, status $(jq -r .status "$TMP/first.json")"

API=http://127.0.0.1:$SPECTRAL_PORT/api/worlds/acme-payments
# shellcheck source=bench/shadows.sh
. bench/shadows.sh
declare -A SHADOW_VERSION
for kind in $SHADOWS; do
    SHADOW_VERSION[$kind]=$(publish_shadow "$kind")
    echo "shadow '$kind': version ${SHADOW_VERSION[$kind]}"
done
shadow_counts() { # the running shadow's counts, or {}
    if [ -n "$SHADOW_NOW" ]; then
        api GET /shadow | jq -c '{evaluated: .report.evaluated, skipped: .report.skipped,
            differing: .report.differing, pending}'
    else
        echo '{}'
    fi
}
SHADOW_NOW=

cpu_ticks() { # pid -> utime+stime of the whole process, in clock ticks
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))
}
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
decision_log() { # spectral's decision-log counters from /health
    curl -fsS "http://127.0.0.1:$SPECTRAL_PORT/health" | jq -c '.features.decision_log // {}'
}
busy_ticks() { # user+nice+system+steal of all CPUs, in clock ticks
    awk '$1 == "cpu" { print $2 + $3 + $4 + $9; exit }' /proc/stat
}

# load RUN LABEL URL SERVER_PID CONNECTIONS [RATE]: one load-generator run, its JSON line
# (with the server's CPU use added) appended to $RESULTS and echoed.
load() {
    local run=$1 label=$2 url=$3 pid=$4 conns=$5 rate=${6:-}
    local args=(--url "$url" -X POST --body-file "${LOAD_BODY:-$BODY}" -H "$AUTH"
        -H 'content-type: application/json' -c "$conns"
        --duration "$DURATION" --warmup "$WARMUP" --label "$label")
    [ -n "$rate" ] && args+=(--rate "$rate")
    local t0 t1 c0 c1 b0 b1 line log0='{}' log1='{}' sh0='{}' sh1='{}'
    if [ "$pid" = "$SPECTRAL_PID" ]; then
        # Rows start with the decision log's queue empty, so one row's backlog is not
        # written during the next (waits at most 20 s).
        for _ in $(seq 200); do
            [ "$(decision_log | jq '.queue_depth // 0')" = 0 ] &&
                [ "$(shadow_counts | jq '.pending // 0')" = 0 ] && break
            sleep 0.1
        done
        log0=$(decision_log)
        sh0=$(shadow_counts)
    fi
    c0=$(cpu_ticks "$pid")
    b0=$(busy_ticks)
    t0=$(date +%s%N)
    "${CLIENT_PIN[@]}" "$BIN/examples/loadgen" "${args[@]}" >"$TMP/line.json" &
    LOADGEN_PID=$!
    wait "$LOADGEN_PID"
    LOADGEN_PID=
    t1=$(date +%s%N)
    b1=$(busy_ticks)
    c1=$(cpu_ticks "$pid")
    if [ "$pid" = "$SPECTRAL_PID" ]; then
        log1=$(decision_log)
        sh1=$(shadow_counts)
    fi
    # server_cpu_pct: the server process (all threads); other_cpu_pct: CPU time used on the
    # machine by anything but the server and the load generator (other builds, services):
    # more than a few percent means the run was disturbed. Softirq time is left out of both.
    # log_dropped: decision records the server dropped during this row (queue full);
    # log_queue: records still waiting to be written when the row ended.
    line=$(jq -c --argjson run "$run" --argjson hz "$HZ" --argjson ns $((t1 - t0)) \
        --argjson srv $((c1 - c0)) --argjson all $((b1 - b0)) \
        --argjson log0 "$log0" --argjson log1 "$log1" \
        --argjson sh0 "$sh0" --argjson sh1 "$sh1" \
        '($ns / 1e9) as $s | (.client_cpu_pct // 0) as $cli
        | . + {run: $run,
            server_cpu_pct: (1000 * $srv / $hz / $s | round / 10),
            other_cpu_pct: ([0, 1000 * (($all - $srv) / $hz / $s - $cli / 100) | round / 10] | max),
            log_dropped: (if $log1.dropped then $log1.dropped - $log0.dropped else null end),
            log_queue: $log1.queue_depth,
            shadow_evaluated: (if $sh1.evaluated then $sh1.evaluated - $sh0.evaluated else null end),
            shadow_skipped: (if $sh1.skipped then $sh1.skipped - $sh0.skipped else null end)}' \
        "$TMP/line.json")
    echo "$line" >>"$RESULTS"
    echo "$line" >>"$OUT/progress.log"
    echo "$line" | jq -r '"  \(.label): \(.rps) req/s, p50 \(.latency_us.p50) µs, p99 \(.latency_us.p99) µs"' >&2
}

table() { # jq filter selecting rows -> aligned table
    jq -rs "$1"' | (["run", "mode", "c", "rate", "req/s", "p50 µs", "p90 µs", "p99 µs",
        "p99.9 µs", "max µs", "non-2xx", "errors", "log drops", "shadow eval", "shadow skip",
        "srv CPU%", "cli CPU%", "other CPU%"] | @tsv),
        (.[] | [.label, .mode, .connections, (.target_rate // "-" | tostring),
        .rps, .latency_us.p50, .latency_us.p90, .latency_us.p99, .latency_us.p999,
        .latency_us.max, .non_2xx, .errors, (.log_dropped // "-"),
        (.shadow_evaluated // "-"), (.shadow_skipped // "-"), .server_cpu_pct,
        (.client_cpu_pct // "-"),
        .other_cpu_pct]
        | map(tostring) | @tsv)' "$RESULTS" | if command -v column >/dev/null; then
        column -t -s $'\t'
    else
        cat
    fi
}

for run in $(seq "$RUNS"); do
    echo "== run $run of $RUNS ($PINNING; ${WARMUP}s warm-up + ${DURATION}s per row)"
    load "$run" "hello c=$CONNS" "$HELLO_URL" "$HELLO_PID" "$CONNS"
    load "$run" "decide c=$CONNS" "$DECIDE_URL" "$SPECTRAL_PID" "$CONNS"
    max=$(jq -s --argjson run "$run" --arg l "decide c=$CONNS" \
        'map(select(.run == $run and .label == $l))[0].rps' "$RESULTS")
    rate=$(awk -v m="$max" -v f="$HALF" 'BEGIN { printf "%d", m * f }')
    LOAD_BODY=$PEERS_BODY load "$run" "decide 1-rule c=$CONNS" "$DECIDE_URL" "$SPECTRAL_PID" "$CONNS"
    load "$run" "decide open" "$DECIDE_URL" "$SPECTRAL_PID" "$CONNS" "$rate"
    load "$run" "hello open" "$HELLO_URL" "$HELLO_PID" "$CONNS" "$rate"
    load "$run" "hello c=1" "$HELLO_URL" "$HELLO_PID" 1
    load "$run" "decide c=1" "$DECIDE_URL" "$SPECTRAL_PID" 1
    for kind in $SHADOWS; do
        api POST /shadow "{\"version\": ${SHADOW_VERSION[$kind]}, \"sample\": $SAMPLE}" >/dev/null
        SHADOW_NOW=$kind
        load "$run" "decide c=$CONNS shadow=$kind" "$DECIDE_URL" "$SPECTRAL_PID" "$CONNS"
        load "$run" "decide open shadow=$kind" "$DECIDE_URL" "$SPECTRAL_PID" "$CONNS" "$rate"
        api DELETE /shadow >/dev/null
        SHADOW_NOW=
    done
done

sleep 1 # let the decision log's writer catch up before reading its counters
health=$(curl -fsS "http://127.0.0.1:$SPECTRAL_PORT/health")

echo
echo "Machine: $(nproc --all) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $PINNING"
echo "Code: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' with uncommitted changes'), $(rustc --version 2>/dev/null)"
echo "Settings: DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS HALF=$HALF RUNS=$RUNS NICE=${NICE:-}; POST $(wc -c <"$BODY") B body, keep-alive"
for run in $(seq "$RUNS"); do
    echo
    echo "Run $run:"
    table "map(select(.run == $run))"
done

# Per-row medians over the runs (the middle value; the upper middle for an even count).
MEDIANS=$(jq -cs 'def med: sort | .[length / 2 | floor];
    . as $rows | [$rows[] | select(.run == 1) | .label] | map(. as $l
      | [$rows[] | select(.label == $l)] | . as $g | {label: .[0].label, mode: .[0].mode,
      connections: .[0].connections,
      target_rate: (map(.target_rate) | if .[0] == null then null else med end),
      rps: (map(.rps) | med), non_2xx: (map(.non_2xx) | add), errors: (map(.errors) | add),
      log_dropped: (map(.log_dropped) | if .[0] == null then null else add end),
      shadow_evaluated: (map(.shadow_evaluated) | if .[0] == null then null else add end),
      shadow_skipped: (map(.shadow_skipped) | if .[0] == null then null else add end),
      server_cpu_pct: (map(.server_cpu_pct) | med), client_cpu_pct: (map(.client_cpu_pct) | med),
      other_cpu_pct: (map(.other_cpu_pct) | med),
      latency_us: (reduce (.[0].latency_us | keys)[] as $k ({};
        .[$k] = ([$g[] | .latency_us[$k]] | med)))})' "$RESULTS")
if [ "$RUNS" -gt 1 ]; then
    echo
    echo "Medians over $RUNS runs (per row and column; non-2xx, errors and log drops are totals):"
    echo "$MEDIANS" | jq -c '.[]' >"$TMP/medians.jsonl"
    RESULTS_SAVED=$RESULTS
    RESULTS=$TMP/medians.jsonl
    table "."
    RESULTS=$RESULTS_SAVED
fi

# The targets (issue 12), on the medians.
pick() { echo "$MEDIANS" | jq -r --arg l "$1" "map(select(.label == \$l))[0]$2"; }
hello_rps=$(pick "hello c=$CONNS" .rps)
decide_rps=$(pick "decide c=$CONNS" .rps)
one_rule_rps=$(pick "decide 1-rule c=$CONNS" .rps)
p99=$(pick "decide open" .latency_us.p99)
rate=$(pick "decide open" .target_rate)
echo
awk -v d="$decide_rps" -v o="$one_rule_rps" -v h="$hello_rps" -v p="$p99" -v r="$rate" -v c="$CONNS" 'BEGIN {
    ratio = d / h
    printf "decide/hello throughput at c=%d, 11 rules: %.0f / %.0f = %.2f  (target >= 0.5: %s)\n",
        c, d, h, ratio, ratio >= 0.5 ? "met" : "NOT met"
    printf "decide/hello throughput at c=%d, 1 rule: %.0f / %.0f = %.2f  (target >= 0.6: %s)\n",
        c, o, h, o / h, o / h >= 0.6 ? "met" : "NOT met"
    printf "decide p99 open loop at %d req/s (half of max): %.3f ms  (target < 1 ms: %s)\n",
        r, p / 1000, p < 1000 ? "met" : "NOT met"
}'
for kind in $SHADOWS; do
    with=$(pick "decide c=$CONNS shadow=$kind" .rps)
    p99s=$(pick "decide open shadow=$kind" .latency_us.p99)
    awk -v w="$with" -v d="$decide_rps" -v p="$p99s" -v q="$p99" -v k="$kind" -v s="$SAMPLE" 'BEGIN {
        printf "decide with the %s shadow at sample %s / without, c=%s: %.0f / %.0f = %.2f  (target >= 0.90: %s)\n",
            k, s, '"$CONNS"', w, d, w / d, w / d >= 0.9 ? "met" : "NOT met"
        printf "decide p99 open loop with the %s shadow: %.3f ms, without: %.3f ms\n", k, p / 1000, q / 1000
    }'
done
echo "decision log after the runs (/health): $(echo "$health" | jq -c .features.decision_log)"
busy=$(jq -rs 'map(select(.other_cpu_pct > 10)) | map("\(.run)/\(.label) \(.other_cpu_pct)%") | join(", ")' \
    "$RESULTS")
[ -z "$busy" ] || echo "warning: other processes used CPU during: $busy; those figures are disturbed"
[ -n "${BENCH_OUT:-}" ] && echo "raw results: $RESULTS"
exit 0
