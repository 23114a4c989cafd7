#!/usr/bin/env bash
# Downtime of a Ferry cold backup of a PostgreSQL data directory under a
# pgbench write load: Ferry's two passes against stop-then-copy-everything.
#
#   bench/downtime.sh [--runs N] [--scale S] [--work DIR] [--results DIR]
#                     [--bin-dir DIR] [--pre-stop checkpoint|none]
#
# Setup (fresh each time, under the work directory, default
# /var/tmp/ferry-bench/downtime): a controller (`ferry-controller init` +
# `serve` on a port chosen by the OS), the operator's ferryctl settings, an
# agent enrolled with a join token whose config declares one host-driver app,
# bench/pg, with one stateful component: PostgreSQL on a data directory filled
# by `pgbench -i -s S` (default scale 80: about 1.2 GiB of tables and
# indexes, plus WAL; its size is printed; kept and reused between
# invocations of the same scale), started and stopped with pg_ctl (fast
# shutdown; as the postgres user when root), its status `pg_isready`, and
# (--pre-stop checkpoint, the default) a `CHECKPOINT` as its pre_stop hook,
# so the stop's own checkpoint has little left to write.
#
# Then N runs (default 3) of each method, alternating (ABBA):
#   two-pass: `ferryctl app backup` (cold mode) into a fresh local storage
#     location: pre-copy while PostgreSQL runs, stop, delta pass, start;
#   baseline: the same CHECKPOINT (unless --pre-stop none), stop PostgreSQL
#     (the same pg_ctl command), `ferry-agent snapshot
#     create` of the data directory into a fresh repository (a full copy with
#     the same data mover), start it again.
# Before each: a CHECKPOINT, then `pgbench -c 4 -j 2 -n` (TPC-B-like writes)
# runs for 10 s and keeps running through the backup until PostgreSQL stops;
# then the page cache is dropped (when root), so both methods start from a
# cold cache. An outside poller probes
# PostgreSQL every 20 ms the way pg_isready does (a login on its socket,
# bench/downtime.py, no fork per probe): the downtime observed is the longest
# interval in which it did not accept connections. The two-pass run also
# records the downtime Ferry reports (`ferryctl backup show ID -o json`), the
# passes it records (pre-copy and delta times, bytes the delta read, bytes
# new), the stop time the agent logged, and what the agent read while
# PostgreSQL was down (/proc/PID/io).
#
# Results: raw.jsonl (one line per run and method, plus the setup),
# summary.md, and each run's files (probes, pgbench log, ferryctl output) in
# the results directory, default ~/.cache/ferry-bench/results/downtime-<time>.
# Binaries: --bin-dir (default $CARGO_TARGET_DIR/release, built with
# `cargo build --release --bins` when missing), copied into the work
# directory first so a rebuild during the run does not mix versions.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)

RUNS=3
SCALE=80
WORK=${FERRY_BENCH_WORK:-/var/tmp/ferry-bench}/downtime
RESULTS=""
BIN_DIR=""
WARMUP_SECS=10
PGBENCH_ARGS=(-c 4 -j 2 -T 3600 -n -P 1)
PRE_STOP=checkpoint
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
        --scale) SCALE=${2:?--scale needs a value}; shift 2 ;;
        --work) WORK=${2:?--work needs a value}; shift 2 ;;
        --results) RESULTS=${2:?--results needs a value}; shift 2 ;;
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a value}; shift 2 ;;
        --pre-stop) PRE_STOP=${2:?--pre-stop needs a value}; shift 2
            case $PRE_STOP in checkpoint|none) ;; *) die "--pre-stop is checkpoint or none, not $PRE_STOP" ;; esac ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs '$RUNS' is not a positive integer"
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "--scale '$SCALE' is not a positive integer"
case $WORK in *[\"\\\ ]*) die "work directory '$WORK' has a space, quote or backslash" ;; esac

ensure_packages python3 postgresql runuser
ROOT=no
[ "$(id -u)" = 0 ] && ROOT=yes
PGBIN=$(pg_bindir)
PY=$BENCH_DIR/downtime.py

# ---- binaries -----------------------------------------------------------------
if [ -z "$BIN_DIR" ]; then
    BIN_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release
    if ! [ -x "$BIN_DIR/ferry-controller" ] || ! [ -x "$BIN_DIR/ferry-agent" ] || ! [ -x "$BIN_DIR/ferryctl" ]; then
        command -v cargo >/dev/null || die "no binaries in $BIN_DIR and no cargo to build them (pass --bin-dir)"
        log "building the release binaries (cargo build --release --bins)"
        (cd "$REPO_ROOT" && cargo build --release --bins -q) || die "cargo build --release --bins failed"
    fi
fi
for b in ferry-controller ferry-agent ferryctl; do
    [ -x "$BIN_DIR/$b" ] || die "no $b in $BIN_DIR"
done

# ---- work directory -----------------------------------------------------------
mkdir -p "$WORK"
chmod 755 "$WORK"
WORK=$(cd "$WORK" && pwd)
S=$WORK/session                      # controller, agent, repositories: fresh each time
PGDATA=$WORK/pgdata-s$SCALE          # kept between invocations of the same scale
PGRUN=$WORK/pg-run                   # the server's socket and log
PIDS=$WORK/pids
[ ${#PGRUN} -lt 90 ] || die "work directory path too long for a unix socket: $WORK"
if [ -s "$PIDS" ]; then
    while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            die "$name (pid $pid) of an earlier run in $WORK still runs; stop it, or remove $PIDS"
        fi
    done <"$PIDS"
fi
: >"$PIDS"
if [ -f "$PGDATA/postmaster.pid" ] && kill -0 "$(head -n1 "$PGDATA/postmaster.pid")" 2>/dev/null; then
    die "PostgreSQL already runs on $PGDATA (pid $(head -n1 "$PGDATA/postmaster.pid")); stop it first"
fi
rm -rf "$S"
mkdir -p "$S/bin" "$S/logs"
for b in ferry-controller ferry-agent ferryctl; do cp "$BIN_DIR/$b" "$S/bin/"; done
BIN=$S/bin
RESULTS=${RESULTS:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-bench/results/downtime-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
RAW=$RESULTS/raw.jsonl
: >"$RAW"

# The PostgreSQL commands: the agent's app runs exactly these, and so does
# the baseline.
if [ $ROOT = yes ]; then AS_PG=(runuser -u postgres --) NICE=(nice -n -10); else AS_PG=() NICE=(); fi
PG_START=("${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGRUN/postgres.log" -w -t 600 start)
PG_STOP=("${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 600 stop)
PG_STATUS=("$PGBIN/pg_isready" -q -h "$PGRUN" -U postgres -d postgres)
PG_CHECKPOINT=("$PGBIN/psql" -h "$PGRUN" -U postgres -qAt -c CHECKPOINT postgres)
pg_up() { "${PG_STATUS[@]}" -t 2; }
psql_c() { "$PGBIN/psql" -h "$PGRUN" -U postgres -qAt -c "$1" postgres; }

now_ns() { local t=${EPOCHREALTIME//[.,]/}; printf '%s000\n' "$t"; }
# wait_for SECS WHAT CMD…: until CMD succeeds, at most SECS seconds
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.1
    done
}
drop_caches() {
    [ $ROOT = yes ] || return 0
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# ---- clean-up: everything this script started, even on failure ----------------
CONTROLLER_PID="" AGENT_PID="" PGBENCH_PID="" POLLER_PID="" FG_PID=""
# stop_pid PID: TERM, then KILL after 30 s; waits for it
stop_pid() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# interruptible OUT ERR CMD…: runs CMD in the background, its output into OUT
# and ERR, and waits, so a signal to this script is handled at once (the
# clean-up stops CMD)
interruptible() {
    local out=$1 err=$2 rc=0
    shift 2
    "$@" >"$out" 2>"$err" &
    FG_PID=$!
    wait "$FG_PID" || rc=$?
    FG_PID=""
    return $rc
}
stop_load() {
    stop_pid "$POLLER_PID"
    POLLER_PID=""
    stop_pid "$PGBENCH_PID"
    PGBENCH_PID=""
}
pg_stop_now() {
    if [ -f "$PGDATA/postmaster.pid" ]; then
        "${PG_STOP[@]}" >/dev/null 2>&1 \
            || "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
    fi
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$FG_PID"
    stop_load
    # the agent first: it starts again what a backup it was running stopped
    stop_pid "$AGENT_PID"
    stop_pid "$CONTROLLER_PID"
    pg_stop_now
    : >"$PIDS"
    [ $rc = 0 ] || log "failed (exit $rc); logs in $S/logs and $PGRUN/postgres.log"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- PostgreSQL data directory -----------------------------------------------------
install -d -m 755 "$PGRUN"
[ $ROOT = no ] || { chown postgres: "$PGRUN"; check_postgres_can_reach "$PGRUN"; }
if ! [ -f "$WORK/pgdata-s$SCALE.ready" ]; then
    log "creating the data directory: initdb + pgbench -i -s $SCALE"
    rm -rf "$PGDATA"
    install -d -m 700 "$PGDATA"
    [ $ROOT = no ] || chown postgres: "$PGDATA"
    "${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust --locale=C -E UTF8 >"$S/logs/initdb.log" \
        || die "initdb failed (see $S/logs/initdb.log)"
    # local socket only, in our own directory
    printf '%s\n' "listen_addresses = ''" "unix_socket_directories = '$PGRUN'" >>"$PGDATA/postgresql.conf"
    "${PG_START[@]}" >/dev/null || die "PostgreSQL did not start (see $PGRUN/postgres.log)"
    "$PGBIN/pgbench" -h "$PGRUN" -U postgres -i -q -s "$SCALE" postgres >"$S/logs/pgbench-init.log" 2>&1 \
        || die "pgbench -i failed (see $S/logs/pgbench-init.log)"
    psql_c checkpoint
    "${PG_STOP[@]}" >/dev/null
    echo "$SCALE" >"$WORK/pgdata-s$SCALE.ready"
fi
"${PG_START[@]}" >/dev/null || die "PostgreSQL did not start (see $PGRUN/postgres.log)"
pg_up || die "PostgreSQL started but does not accept connections"
PG_VERSION=$(psql_c 'show server_version')
PGDATA_BYTES=$(tree_bytes "$PGDATA")
PGDATA_HUMAN=$(du -sh "$PGDATA" | cut -f1)
log "data directory $PGDATA: $PGDATA_BYTES bytes ($PGDATA_HUMAN on disk), pgbench scale $SCALE, PostgreSQL $PG_VERSION"
[ "$PGDATA_BYTES" -ge 1073741824 ] || log "note: the data directory is smaller than 1 GiB (scale $SCALE; 80 gives about 1.2 GiB)"

# ---- controller, operator, agent ------------------------------------------------------
log "starting a controller and an agent in $S"
"$BIN/ferry-controller" init --data-dir "$S/controller" --san 127.0.0.1 --san localhost >"$S/logs/init.log"
"$BIN/ferry-controller" serve --data-dir "$S/controller" --listen 127.0.0.1:0 \
    --addr-file "$S/controller.addr" >"$S/logs/controller.log" 2>&1 &
CONTROLLER_PID=$!
echo "controller $CONTROLLER_PID" >>"$PIDS"
wait_for 60 "the controller's address" test -s "$S/controller.addr"
unset FERRY_CONFIG FERRY_OUTPUT
export FERRY_CONTROLLER="https://$(cat "$S/controller.addr")"
export FERRY_CA=$S/controller/operator/ca.crt
export FERRY_CERT=$S/controller/operator/operator.crt
export FERRY_KEY=$S/controller/operator/operator.key
printf 'export FERRY_CONTROLLER=%s FERRY_CA=%s FERRY_CERT=%s FERRY_KEY=%s\n' \
    "$FERRY_CONTROLLER" "$FERRY_CA" "$FERRY_CERT" "$FERRY_KEY" >"$S/ferryctl.env"
CTL=$BIN/ferryctl

"$CTL" token create --cluster bench --ttl 10m -o json >"$S/token.json"
FERRY_JOIN_TOKEN=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$S/token.json")
FINGERPRINT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ca_fingerprint"])' "$S/token.json")
FERRY_JOIN_TOKEN=$FERRY_JOIN_TOKEN "$BIN/ferry-agent" join --controller "$FERRY_CONTROLLER" \
    --ca-fingerprint "$FINGERPRINT" --data-dir "$S/agent" --node bench-node >"$S/logs/join.log" 2>&1 \
    || die "ferry-agent join failed (see $S/logs/join.log)"
toml_argv() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$@"; }
cat >"$S/agent.toml" <<TOML
controller = "$FERRY_CONTROLLER"
data_dir = "$S/agent"
command_timeout_secs = 900

[[apps]]
name = "pg"
team = "bench"

[[apps.components]]
name = "postgres"
stateful = true
volumes = ["$PGDATA"]
start = $(toml_argv "${PG_START[@]}")
stop = $(toml_argv "${PG_STOP[@]}")
status = $(toml_argv "${PG_STATUS[@]}")
TOML
[ "$PRE_STOP" = checkpoint ] && echo "pre_stop = $(toml_argv "${PG_CHECKPOINT[@]}")" >>"$S/agent.toml"
"$BIN/ferry-agent" run --config "$S/agent.toml" >"$S/logs/agent.log" 2>&1 &
AGENT_PID=$!
echo "agent $AGENT_PID" >>"$PIDS"
wait_for 60 "the agent online" sh -c "'$CTL' agent ls -o json | grep -q '\"online\": true'"
wait_for 60 "the app in the inventory" sh -c "'$CTL' app ls --cluster bench -o json | grep -q '\"pg\"'"

PW=$S/repo.password
head -c 24 /dev/urandom | base64 >"$PW"
chmod 600 "$PW"

DROP=no
[ $ROOT = yes ] && DROP=yes
python3 - "$RAW" <<EOF
import json, os, subprocess, sys
def sh(c):
    return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
bin_dir = "$BIN_DIR"
json.dump({
    "kind": "setup", "date": sh("date -Iseconds"), "runs": $RUNS, "scale": $SCALE,
    "pgdata": "$PGDATA", "pgdata_bytes": $PGDATA_BYTES, "pgdata_human": "$PGDATA_HUMAN",
    "postgres": "$PG_VERSION", "pgbench_args": "${PGBENCH_ARGS[*]}", "warmup_secs": $WARMUP_SECS,
    "drop_caches": "$DROP" == "yes", "bin_dir": bin_dir, "pre_stop": "$PRE_STOP",
    "build": "debug" if "/debug" in bin_dir else ("release" if "/release" in bin_dir else "unknown"),
    "ferry": sh("'$BIN/ferry-agent' --version"), "commit": sh("git -C '$REPO_ROOT' rev-parse --short HEAD"),
    "cores": os.cpu_count(), "kernel": sh("uname -r"),
    "cpu_model": sh("sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1"),
    "filesystem": sh("df --output=fstype '$WORK' | tail -n1"),
}, open(sys.argv[1], "a"))
open(sys.argv[1], "a").write("\n")
EOF
[ $DROP = yes ] || log "not root: the page cache is NOT dropped before the backups"

# ---- one run ----------------------------------------------------------------------------
# start_load DIR: checkpoint, pgbench in the background, warm-up, cold cache,
# then the poller (AGENT_PID given: it also samples the agent's I/O counters)
start_load() {
    local d=$1 agent=${2:-}
    pg_up || die "PostgreSQL does not accept connections before run $(basename "$d")"
    psql_c checkpoint
    echo "pgbench_start_ns $(now_ns)" >>"$d/times"
    "$PGBIN/pgbench" -h "$PGRUN" -U postgres "${PGBENCH_ARGS[@]}" postgres >"$d/pgbench.log" 2>&1 &
    PGBENCH_PID=$!
    sleep "$WARMUP_SECS"
    kill -0 "$PGBENCH_PID" 2>/dev/null || die "pgbench ended during its warm-up: $(tail -n 3 "$d/pgbench.log")"
    drop_caches
    # a higher priority than the load (when root): probes keep their pace
    "${NICE[@]}" python3 "$PY" poll "$PGRUN" "$d/probes" $agent &
    POLLER_PID=$!
    wait_for 10 "the first probe" awk '$3 == 0 { f = 1 } END { exit !f }' "$d/probes"
}
# end_load DIR: until PostgreSQL is up and the poller has seen it, then stop both
end_load() {
    local d=$1 t
    wait_for 600 "PostgreSQL up again" pg_up
    t=$(now_ns)
    wait_for 10 "a probe that sees PostgreSQL up" awk -v t="$t" '$1 > t && $3 == 0 { f = 1 } END { exit !f }' "$d/probes"
    stop_load
}

two_pass() {
    local n=$1 d=$RESULTS/run-$n-two-pass repo=$S/storage-$n ok=true id
    mkdir -p "$d"
    log "run $n, two-pass: ferryctl app backup (cold) into storage dt-$n"
    "$BIN/ferry-agent" repo init --repo "$repo" --password-file "$PW" >/dev/null
    "$CTL" storage add "dt-$n" --password-file "$PW" local --cluster bench --path "$repo" -o json >"$d/storage.json"
    start_load "$d" "$AGENT_PID"
    echo "start_ns $(now_ns)" >>"$d/times"
    interruptible "$d/backup.json" "$d/backup.err" \
        "$CTL" app backup pg --cluster bench --team bench --storage "dt-$n" -o json || ok=false
    echo "end_ns $(now_ns)" >>"$d/times"
    end_load "$d"
    echo "ok $ok" >>"$d/times"
    if $ok; then
        id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["backup_id"])' "$d/backup.json")
        "$CTL" backup show "$id" -o json >"$d/show.json"
    else
        log "ferryctl app backup failed: $(tail -n 3 "$d/backup.err")"
    fi
    python3 "$PY" record two-pass "$d" "$n" "$S/logs/agent.log" >>"$RAW"
    "$CTL" storage rm "dt-$n" >/dev/null
    rm -rf "$repo"
    tail -n1 "$RAW" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  downtime reported %s ms, observed %s ms; pre-copy %s ms, stop %s ms, delta pass %s ms reading %s bytes (new over both passes %s)" % tuple(r.get(k) for k in ("ferry_downtime_ms", "observed_downtime_ms", "ferry_pre_copy_ms", "log_stop_ms", "ferry_delta_ms", "ferry_delta_bytes_read", "ferry_bytes_new")))' >&2
}

baseline() {
    local n=$1 d=$RESULTS/run-$n-baseline repo=$S/baseline-$n ok=true
    mkdir -p "$d"
    log "run $n, baseline: stop, ferry-agent snapshot create into a fresh repository, start"
    "$BIN/ferry-agent" repo init --repo "$repo" --password-file "$PW" >/dev/null
    start_load "$d"
    if [ "$PRE_STOP" = checkpoint ]; then
        "${PG_CHECKPOINT[@]}" >"$d/checkpoint.log" 2>&1 || die "CHECKPOINT failed: $(tail -n 3 "$d/checkpoint.log")"
    fi
    echo "stop_ns $(now_ns)" >>"$d/times"
    if "${PG_STOP[@]}" >"$d/stop.log" 2>&1; then
        echo "stopped_ns $(now_ns)" >>"$d/times"
        interruptible "$d/snapshot.json" "$d/snapshot.err" \
            "$BIN/ferry-agent" snapshot create "$PGDATA" --repo "$repo" --password-file "$PW" -o json || { ok=false; echo "error snapshot-create-failed" >>"$d/times"; }
        echo "copied_ns $(now_ns)" >>"$d/times"
    else
        ok=false
        echo "error pg_ctl-stop-failed" >>"$d/times"
    fi
    "${PG_START[@]}" >"$d/start.log" 2>&1 || die "PostgreSQL did not start again (see $PGRUN/postgres.log)"
    echo "started_ns $(now_ns)" >>"$d/times"
    end_load "$d"
    echo "ok $ok" >>"$d/times"
    python3 "$PY" record baseline "$d" "$n" >>"$RAW"
    rm -rf "$repo"
    tail -n1 "$RAW" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  observed %s ms (stop %s, copy %s, start %s ms), read %s bytes" % (r.get("observed_downtime_ms"), r.get("stop_ms"), r.get("copy_ms"), r.get("start_ms"), r.get("snapshot_bytes_read")))' >&2
}

for n in $(seq "$RUNS"); do
    if [ $((n % 2)) = 1 ]; then two_pass "$n"; baseline "$n"; else baseline "$n"; two_pass "$n"; fi
done

python3 "$PY" summary "$RAW" | tee "$RESULTS/summary.md"
cp "$S/logs/agent.log" "$S/logs/controller.log" "$RESULTS/" 2>/dev/null || true
log "results in $RESULTS"
