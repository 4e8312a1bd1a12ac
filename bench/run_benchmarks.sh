#!/usr/bin/env bash
# Every figure of docs/BENCHMARKS.md, measured with `cluster bench` against `cluster up` on loopback.
#
#   bench/run_benchmarks.sh [OUT_DIR]        (then: .venv/bin/python bench/summarize.py OUT_DIR)
#
# Knobs (environment): BENCH_TABLE=0 (skip the ours-vs-derper table, step 6), BENCH_TABLE_ARGS (extra
# bench/derp_table.py flags, e.g. "--rounds 5"), BENCH_PROFILE=1 (also profile one worker against derper under Tailscale's own
# client, plain and TLS: bench/profile_hot_path.py, needs perf, py-spy and Go), BENCH_SECONDS (measured seconds per run, default 5), BENCH_ROUNDS (alternating
# floor/target rounds, default 3), BENCH_IDLE_CLIENTS (default 10000), BENCH_PROCS (generator processes).
# Each scenario gets a fresh cluster so that one run's leftovers (Python's freed-but-kept memory, a
# directory full of tombstones) do not colour the next.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-bench/results/$(date +%Y%m%d-%H%M%S)}
SECS=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
IDLE=${BENCH_IDLE_CLIENTS:-10000}
PROCS=${BENCH_PROCS:-2}
PY=.venv/bin/python
CLUSTER=.venv/bin/cluster
WORK=$(mktemp -d /tmp/derp-bench.XXXXXX)
mkdir -p "$OUT"
CLUSTER_PID=""

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_cluster() {  # start_cluster WORKERS NAME: sets PORT, RUN
    local workers=$1 name=$2
    PORT=$(free_port)
    RUN="$WORK/$name/run"
    setsid "$CLUSTER" up --workers "$workers" --listen "127.0.0.1:$PORT" --no-stun \
        --state-dir "$WORK/$name" --run-dir "$RUN" >"$WORK/$name.log" 2>&1 &
    CLUSTER_PID=$!
    for _ in $(seq 300); do
        grep -q "DERP cluster serving" "$WORK/$name.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q "DERP cluster serving" "$WORK/$name.log" || { cat "$WORK/$name.log"; exit 1; }
    sleep 1  # let multi-worker clusters finish meeting each other
    echo "== $name: cluster up --workers $workers on 127.0.0.1:$PORT"
}

stop_cluster() {
    if [ -n "$CLUSTER_PID" ]; then
        kill -TERM -- "-$CLUSTER_PID" 2>/dev/null || true
        wait "$CLUSTER_PID" 2>/dev/null || true
        CLUSTER_PID=""
    fi
}
trap 'stop_cluster; rm -rf "$WORK"' EXIT

bench() {  # bench NAME ARGS...: run and keep the JSON (latency histograms are summarised already)
    local name=$1
    shift
    echo "   cluster bench $*"
    "$CLUSTER" bench "$@" --url "http://127.0.0.1:$PORT/derp" --run-dir "$RUN" --procs "$PROCS" --json \
        >"$OUT/$name.json"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- relay_worker mesh cluster derptools || echo ' (+ uncommitted changes)')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "kernel: $(uname -r)"
    echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
    echo "uvloop: $("$PY" -c 'import uvloop; print(uvloop.__version__)')"
    echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

# 1. Same-worker relay against the floor relays, alternating rounds; plus a light-load latency run.
start_cluster 1 one-worker
bench same_worker_vs_floor relay --pairs 8 --size 1200 --window 32 --seconds "$SECS" --same-worker \
    --compare-floor --floor-mode both --rounds "$ROUNDS"
bench light_load relay --pairs 8 --size 1200 --window 1 --seconds "$SECS" --same-worker
stop_cluster

# 2. Two workers: every pair split across them, against the same cluster with pairs kept together.
start_cluster 2 two-workers
for round in $(seq "$ROUNDS"); do
    bench "two_workers_same_$round" relay --pairs 8 --size 1200 --window 32 --seconds "$SECS" --same-worker
    bench "two_workers_cross_$round" relay --pairs 8 --size 1200 --window 32 --seconds "$SECS" --cross-worker
done
stop_cluster

# 3. Handshakes per second, verification off (the default), one worker.
start_cluster 1 handshakes
bench connect connect --concurrency 32 --seconds "$SECS"
stop_cluster

# 4. Idle clients on one fresh worker: RSS per client, then every client relays one packet.
start_cluster 1 idle
bench idle idle --clients "$IDLE" --concurrency 256
stop_cluster

# 5. One pair (exactly 2 clients) on one fresh worker: what a single sender/receiver pair gets.
start_cluster 1 one-pair
for round in $(seq "$ROUNDS"); do
    bench "one_pair_$round" relay --pairs 1 --size 1200 --window 32 --seconds "$SECS"
done
stop_cluster

# 6. The issue-16 table: ours against a stock derper under Tailscale's own client (bench/derp_table.py:
#    plain/TLS, 1 worker pinned, 1 and N workers on the whole machine with same/cross/random placement,
#    the same capped to a CPU quota (capacity), 100/1200-byte packets, 20/200 pairs; idle RSS per TLS
#    client and handshakes/s; one tsnet TCP flow, which needs root). About 45 minutes at its defaults; BENCH_TABLE=0 skips it, BENCH_TABLE_ARGS adds flags.
if [ "${BENCH_TABLE:-1}" = 1 ]; then
    echo "== table: bench/derp_table.py"
    # shellcheck disable=SC2086
    "$PY" bench/derp_table.py --idle-clients "$IDLE" ${BENCH_TABLE_ARGS:-} \
        --markdown "$OUT/table.md" --json "$OUT/table.json"
fi

# 7. Optional: where a packet's CPU goes, ours vs derper, under derpload (docs/BENCHMARKS.md).
if [ "${BENCH_PROFILE:-0}" = 1 ]; then
    for transport in plain tls; do
        echo "== profile $transport: bench/profile_hot_path.py"
        "$PY" bench/profile_hot_path.py --transport "$transport" --server-cpus 0 --load-cpus 1 \
            --out "$OUT/profile-$transport"
    done
fi

echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"
echo "results in $OUT; summary: $PY bench/summarize.py $OUT"
