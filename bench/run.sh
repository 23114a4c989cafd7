#!/usr/bin/env bash
# Ferry vs restic vs rustic vs borg: one benchmark run on this machine.
#
#   bench/run.sh [--runs N] [--scale S[,S2…]] [--tools "ferry restic rustic borg"]
#                [--cache cold,warm] [--work DIR] [--results DIR] [--ferry-bin PATH]
#
# For every scale, every run (default 3 runs of scale 1) and every cache mode
# (default both), each tool goes through the same cycle on the same copy of
# the dataset:
#   initial backup → (dataset mutated by bench/mutate.sh) → incremental backup
#   → no-change backup → repository size → full restore into a fresh directory,
# each step under /usr/bin/time (wall seconds, peak RSS). In `cold` mode the
# page cache is dropped before every step (what a real backup meets); in
# `warm` mode the dataset is read into it first. Every restore is checked
# against the source tree (content, modes, owners, mtimes, symlinks, hard
# links). Restore targets and dataset copies are kept until the end
# of the benchmark (ext4 is slow to create files right after many were
# deleted), so the work directory needs about (4 restores + 2) x the
# dataset per run and cache mode. The machine limit is measured in the same run: the disk's cold
# read rate of the dataset with 2 and with 8 parallel readers (`xargs -P 8
# cat`), and `ferry-agent snapshot create --dry-run` on a warm cache.
#
# Compression: ferry (its default), restic and rustic `--compression auto`
# (restic) / their default (rustic) on a v2 repository, borg
# `--compression zstd,3` with `repokey` (AES-CTR + HMAC-SHA256). rustic is
# installed with `cargo install --locked rustic-rs` into
# ~/.cache/ferry-bench/rustic on first use.
#
# Raw results (raw.jsonl, machine.json) and the summary (summary.json,
# summary.md) go to the results directory, by default
# ~/.cache/ferry-bench/results/<timestamp>. The work directory (datasets,
# repositories) defaults to /var/tmp/ferry-bench; generated datasets are kept
# there and reused by later runs of the same scale.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)

RUNS=3
SCALES=1
TOOLS="ferry restic rustic borg"
CACHES=cold,warm
WORK=${FERRY_BENCH_WORK:-/var/tmp/ferry-bench}
RESULTS=""
FERRY_BIN=""
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=${2:?--runs needs a value}; shift 2 ;;
        --scale) SCALES=${2:?--scale needs a value}; shift 2 ;;
        --tools) TOOLS=${2:?--tools needs a value}; shift 2 ;;
        --cache) CACHES=${2:?--cache needs a value}; shift 2 ;;
        --work) WORK=${2:?--work needs a value}; shift 2 ;;
        --results) RESULTS=${2:?--results needs a value}; shift 2 ;;
        --ferry-bin) FERRY_BIN=${2:?--ferry-bin needs a value}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs '$RUNS' is not a positive integer"
for t in $TOOLS; do
    case $t in ferry|restic|rustic|borg) ;; *) die "unknown tool '$t' (ferry, restic, rustic, borg)" ;; esac
done
IFS=',' read -r -a CACHE_LIST <<<"$CACHES"
for c in "${CACHE_LIST[@]}"; do
    case $c in cold|warm) ;; *) die "unknown cache mode '$c' (cold, warm)" ;; esac
done
IFS=',' read -r -a SCALE_LIST <<<"$SCALES"
for s in "${SCALE_LIST[@]}"; do
    [[ $s =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "scale '$s' is not a positive number"
done
[ "$(id -u)" = 0 ] || die "run.sh runs as root (PostgreSQL as the postgres user, drop_caches, file owners)"

ensure_packages
RESULTS=${RESULTS:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry-bench/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$WORK" "$RESULTS"
chmod 755 "$WORK"
RAW=$RESULTS/raw.jsonl
: >"$RAW"

# Password-free on the command line: every tool reads it from its environment.
BENCH_PASSWORD=$(head -c 24 /dev/urandom | base64)
export RESTIC_PASSWORD=$BENCH_PASSWORD RUSTIC_PASSWORD=$BENCH_PASSWORD BORG_PASSPHRASE=$BENCH_PASSWORD FERRY_REPO_PASSWORD=$BENCH_PASSWORD
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_CHECK_I_KNOW_WHAT_I_AM_DOING=YES

RUN_TMP=$(mktemp -d "$WORK/run.XXXXXX")
chmod 755 "$RUN_TMP"
cleanup() {
    pg_stop
    rm -rf "$RUN_TMP"
}
trap cleanup EXIT

# ---- ferry binary -----------------------------------------------------------
if [[ " $TOOLS " == *" ferry "* ]]; then
    if [ -z "$FERRY_BIN" ]; then
        command -v cargo >/dev/null || die "cargo not found: install Rust or pass --ferry-bin"
        log "building ferry-agent (release)"
        (cd "$REPO_ROOT" && cargo build --release -q -p ferry-agent) || die "cargo build --release -p ferry-agent failed"
        FERRY_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/ferry-agent
    fi
    [ -x "$FERRY_BIN" ] || die "ferry-agent binary $FERRY_BIN is not executable"
    "$FERRY_BIN" snapshot create --help >/dev/null 2>&1 \
        || die "$FERRY_BIN has no 'snapshot create' command yet; run with --tools 'restic borg'"
fi

# ---- rustic binary ------------------------------------------------------------
RUSTIC=""
if [[ " $TOOLS " == *" rustic "* ]]; then
    RUSTIC_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/ferry-bench/rustic
    RUSTIC=$(command -v rustic || true)
    [ -n "$RUSTIC" ] || RUSTIC=$RUSTIC_ROOT/bin/rustic
    if [ ! -x "$RUSTIC" ]; then
        log "installing rustic (cargo install --locked rustic-rs; takes a while once)"
        CARGO_TARGET_DIR=$RUSTIC_ROOT/target cargo install -q --locked rustic-rs --root "$RUSTIC_ROOT" \
            || die "cargo install rustic-rs failed"
        rm -rf "$RUSTIC_ROOT/target"
    fi
fi
export RUSTIC

# ---- machine description ------------------------------------------------------
DROP_CACHES=no
if (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then DROP_CACHES=yes; fi
DISK_DEV=$(df --output=source "$WORK" | tail -n1)
python3 - "$RESULTS/machine.json" <<EOF
import json, os, subprocess, sys
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""
cpu = sh("sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1")
m = {
  "cpu_model": cpu, "cores": os.cpu_count(),
  "mem_total": sh("sed -n 's/^MemTotal: *//p' /proc/meminfo"),
  "kernel": sh("uname -r"),
  "disk_device": "$DISK_DEV",
  "disk_model": sh("lsblk -dno NAME,SIZE,ROTA,MODEL '$DISK_DEV' 2>/dev/null"),
  "filesystem": sh("df --output=fstype '$WORK' | tail -n1"),
  "drop_caches": "$DROP_CACHES" == "yes",
  "restic": sh("restic version"), "borg": sh("borg --version"),
  "rustic": sh("'$RUSTIC' --version") if "$RUSTIC" else "",
  "ferry": sh("'$FERRY_BIN' --version") if "$FERRY_BIN" else "",
  "ferry_commit": sh("git -C '$REPO_ROOT' rev-parse --short HEAD"),
  "ferry_bin": "$FERRY_BIN",
  "ferry_bin_sha256": sh("sha256sum '$FERRY_BIN' | cut -c1-16") if "$FERRY_BIN" else "",
  "ferry_bin_mtime": sh("date -r '$FERRY_BIN' -Iseconds") if "$FERRY_BIN" else "",
  "runs": $RUNS, "scales": "$SCALES", "tools": "$TOOLS", "caches": "$CACHES",
}
json.dump(m, open(sys.argv[1], "w"), indent=2)
EOF

# ---- measurement helpers ------------------------------------------------------

# record KEY=VALUE… : append one JSON object to raw.jsonl
record() {
    python3 - "$@" >>"$RAW" <<'EOF'
import json, sys
o = {}
for kv in sys.argv[1:]:
    k, v = kv.split("=", 1)
    try:
        v = int(v)
    except ValueError:
        try:
            v = float(v)
        except ValueError:
            pass
    o[k] = v
print(json.dumps(o))
EOF
}

warm() { find "$1" -type f -print0 | xargs -0 -r -n 256 -P 2 cat >/dev/null; }
drop_cache() { sync; if [ "$DROP_CACHES" = yes ]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
# Before a measured step: a cold page cache, or the dataset read into it.
prepare_cache() { if [ "$MODE" = cold ]; then drop_cache; else warm "$DATA"; fi; }

# timed SCALE RUN TOOL STEP CMD… : run CMD under /usr/bin/time, record seconds
# and peak RSS; its output goes to $RUN_TMP/last.out. Returns CMD's status.
timed() {
    local scale=$1 run=$2 tool=$3 step=$4
    shift 4
    local tf=$RUN_TMP/time.out load status=0
    sync
    load=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f '%e %M %U %S' -o "$tf" "$@" >"$RUN_TMP/last.out" 2>&1 || status=$?
    if [ $status -ne 0 ]; then
        log "$tool $step failed (exit $status):"
        tail -n 20 "$RUN_TMP/last.out" >&2
        record scale="$scale" run="$run" tool="$tool" step="$step" ok=false exit="$status"
        return $status
    fi
    # how long the data the step left in the page cache takes to reach the disk
    local secs rss user sys t0 sync_s
    t0=$(date +%s.%N)
    sync
    sync_s=$(python3 -c "import time; print(round(time.time() - $t0, 3))")
    read -r secs rss user sys < <(tail -n1 "$tf")
    record scale="$scale" run="$run" tool="$tool" step="$step" ok=true seconds="$secs" \
        rss_kib="$rss" user_s="$user" sys_s="$sys" bytes="$DATA_BYTES" load1="$load" sync_s="$sync_s"
    log "$tool $step: ${secs}s (+${sync_s}s sync), peak RSS ${rss} KiB, cpu user ${user}s sys ${sys}s"
}

# ---- per-tool adapters ----------------------------------------------------------
# Each runs in a fresh bash under /usr/bin/time and ends in `exec`, so the
# measured process is the tool itself. Backups run from inside the dataset
# with the path `.` (restic, borg) so restores land directly in the target.
tool_init() { # TOOL
    local repo=$RUN_TMP/repo-$1
    case $1 in
        ferry) FERRY_REPO=$repo exec "$FERRY_BIN" repo init ;;
        restic) exec restic -q -r "$repo" init --repository-version 2 ;;
        rustic) exec "$RUSTIC" --no-progress -r "$repo" --cache-dir "$RUN_TMP/rustic-cache" init ;;
        borg) BORG_BASE_DIR=$RUN_TMP/borg-base exec borg init -e repokey "$repo" ;;
    esac
}
tool_backup() { # TOOL ARCHIVE-NAME
    local repo=$RUN_TMP/repo-$1
    cd "$DATA"
    case $1 in
        ferry) FERRY_REPO=$repo exec "$FERRY_BIN" snapshot create "$DATA" -o json ;;
        restic) exec restic -q -r "$repo" --cache-dir "$RUN_TMP/restic-cache" backup --compression auto . ;;
        rustic) exec "$RUSTIC" --no-progress -r "$repo" --cache-dir "$RUN_TMP/rustic-cache" backup . ;;
        borg) BORG_BASE_DIR=$RUN_TMP/borg-base exec borg create --compression zstd,3 "$repo::$2" . ;;
    esac
}
tool_restore() { # TOOL TARGET
    local repo=$RUN_TMP/repo-$1
    mkdir -p "$2"
    cd "$2"
    case $1 in
        ferry) FERRY_REPO=$repo exec "$FERRY_BIN" snapshot restore "$FERRY_LAST_ID" --target "$2" ;;
        restic) exec restic -q -r "$repo" --cache-dir "$RUN_TMP/restic-cache" restore latest --target "$2" ;;
        rustic) exec "$RUSTIC" --no-progress -r "$repo" --cache-dir "$RUN_TMP/rustic-cache" restore latest "$2" ;;
        borg) BORG_BASE_DIR=$RUN_TMP/borg-base exec borg extract --sparse "$repo::nochange" ;;
    esac
}
ferry_dry_run() { cd "$DATA" && FERRY_REPO=$RUN_TMP/repo-ferry exec "$FERRY_BIN" snapshot create "$DATA" --dry-run; }
read_all() { find "$DATA" -type f -print0 | xargs -0 -r -n 256 -P 2 cat >/dev/null; }
read_all_par() { find "$DATA" -type f -print0 | xargs -0 -r -n 64 -P 8 cat >/dev/null; }
# Reference only (not part of the limit): zstd -3 alone on two cores.
ref_zstd() { tar -C "$DATA" -cf - . | zstd -q -T2 -3 -c >/dev/null; }
export -f tool_init tool_backup tool_restore ferry_dry_run read_all read_all_par ref_zstd
export RUN_TMP FERRY_BIN

# The id of the snapshot the last `ferry-agent snapshot create -o json` made.
ferry_snapshot_id() {
    python3 - "$RUN_TMP/last.out" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
found = None
dec = json.JSONDecoder()
for m in re.finditer(r"^\{", text, re.M):
    try:
        o, _ = dec.raw_decode(text[m.start():])
    except ValueError:
        continue
    for k in ("snapshot", "snapshot_id", "id"):
        if isinstance(o, dict) and isinstance(o.get(k), str):
            found = o[k]
            break
if not found:
    sys.exit("no snapshot id in ferry-agent output")
print(found)
EOF
}

# ---- the benchmark --------------------------------------------------------------
gen_version=$(cat "$BENCH_DIR/files.py" "$BENCH_DIR/dataset.sh" | sha256sum | cut -c1-16)
for SCALE in "${SCALE_LIST[@]}"; do
    PRISTINE=$WORK/dataset-s$SCALE
    if [ "$(cat "$PRISTINE.ok" 2>/dev/null || true)" != "$gen_version" ]; then
        rm -rf "$PRISTINE" "$PRISTINE.ok"
        log "generating dataset scale $SCALE in $PRISTINE"
        "$BENCH_DIR/dataset.sh" "$PRISTINE" "$SCALE"
        echo "$gen_version" >"$PRISTINE.ok"
    fi

    for RUN in $(seq 1 "$RUNS"); do
      for MODE in "${CACHE_LIST[@]}"; do
        log "scale $SCALE run $RUN/$RUNS, $MODE cache"
        # a fresh copy per run and mode; earlier copies and restore targets
        # stay until the benchmark ends (see the header)
        export DATA=$RUN_TMP/data-r$RUN-$MODE
        rm -rf "$RUN_TMP"/repo-* "$RUN_TMP/borg-base" "$RUN_TMP/restic-cache" "$RUN_TMP/rustic-cache"
        need=$(( $(du -s --block-size=1 "$PRISTINE" | cut -f1) * 6 ))
        free=$(( $(df --output=avail -B1 "$WORK" | tail -n1) ))
        if [ "$free" -lt "$need" ]; then
            log "only $((free >> 30)) GiB free in $WORK, $((need >> 30)) GiB needed: deleting earlier copies (the next restores may be slower)"
            rm -rf "$RUN_TMP"/data-* "$RUN_TMP"/restore-*
            sync
        fi
        cp -a --sparse=always "$PRISTINE" "$DATA"
        DATA_BYTES=$(tree_bytes "$DATA")
        [ "$MODE" = "${CACHE_LIST[0]}" ] && record scale="$SCALE" run="$RUN" step=dataset bytes="$DATA_BYTES" \
            allocated_bytes="$(($(du -s --block-size=1 "$DATA" | cut -f1)))" \
            entries="$(find "$DATA" | wc -l)"
        # rotate the order of the tools from run to run
        read -r -a order <<<"$TOOLS"
        for _ in $(seq 2 "$RUN"); do order=("${order[@]:1}" "${order[0]}"); done
        declare -A failed=()

        # machine limit 1: the disk's cold read rate of the dataset, with 2
        # and with 8 parallel readers (once per run)
        if [ "$MODE" = "${CACHE_LIST[0]}" ]; then
            drop_cache
            timed "$SCALE" "$RUN" machine disk_read bash -c read_all || true
            drop_cache
            timed "$SCALE" "$RUN" machine disk_read_par bash -c read_all_par || true
            warm "$DATA"
            timed "$SCALE" "$RUN" machine ref_zstd bash -c ref_zstd || true
        fi

        for t in "${order[@]}"; do
            bash -c 'tool_init "$1"' _ "$t" >"$RUN_TMP/init-$t.out" 2>&1 \
                || { log "$t init failed: $(tail -n5 "$RUN_TMP/init-$t.out")"; failed[$t]=1; }
        done

        # machine limit 2: what two cores can chunk+hash+compress+encrypt
        if [ "$MODE" = "${CACHE_LIST[0]}" ] && [ -z "${failed[ferry]:-}" ] && [[ " $TOOLS " == *" ferry "* ]]; then
            warm "$DATA"
            timed "$SCALE" "$RUN" machine cpu_dry_run bash -c ferry_dry_run || true
        fi

        step_all() { # STEP NAME
            local step=$1 name=$2 t
            for t in "${order[@]}"; do
                [ -z "${failed[$t]:-}" ] || continue
                prepare_cache
                if timed "$SCALE" "$RUN" "$t" "${step}_$MODE" bash -c 'tool_backup "$1" "$2"' _ "$t" "$name"; then
                    if [ "$t" = ferry ]; then
                        FERRY_LAST_ID=$(ferry_snapshot_id) || { log "ferry: $(tail -n3 "$RUN_TMP/last.out")"; failed[$t]=1; }
                    fi
                else
                    failed[$t]=1
                fi
            done
        }
        step_all initial initial
        "$BENCH_DIR/mutate.sh" "$DATA" "$RUN"
        DATA_BYTES=$(tree_bytes "$DATA")
        step_all incremental incremental
        step_all nochange nochange

        for t in "${order[@]}"; do
            [ -z "${failed[$t]:-}" ] || continue
            [ "$MODE" = "${CACHE_LIST[0]}" ] && record scale="$SCALE" run="$RUN" tool="$t" step=repo_size \
                bytes="$(du -sb "$RUN_TMP/repo-$t" | cut -f1)"
        done

        # reference manifest of the source, then one restore per tool
        python3 "$BENCH_DIR/files.py" manifest "$DATA" >"$RUN_TMP/source.manifest"
        for t in "${order[@]}"; do
            [ -z "${failed[$t]:-}" ] || continue
            target=$RUN_TMP/restore-r$RUN-$MODE-$t
            export FERRY_LAST_ID
            prepare_cache
            if timed "$SCALE" "$RUN" "$t" "restore_$MODE" \
                bash -c 'tool_restore "$1" "$2"' _ "$t" "$target"; then
                python3 "$BENCH_DIR/files.py" manifest "$target" >"$RUN_TMP/restore-$t.manifest"
                ndiff=$( (diff "$RUN_TMP/source.manifest" "$RUN_TMP/restore-$t.manifest" || true) | grep -c '^[<>]' || true)
                if [ "$ndiff" != 0 ]; then
                    diff "$RUN_TMP/source.manifest" "$RUN_TMP/restore-$t.manifest" >"$RESULTS/restore-diff-s$SCALE-r$RUN-$t.txt" || true
                    log "$t restore differs from the source in $ndiff manifest lines (see $RESULTS/restore-diff-s$SCALE-r$RUN-$t.txt)"
                fi
                record scale="$SCALE" run="$RUN" tool="$t" step=restore_check manifest_diff_lines="$ndiff" \
                    allocated_bytes="$(du -s --block-size=1 "$target" | cut -f1)"
            fi
        done
        unset failed
      done
    done
done

python3 "$BENCH_DIR/report.py" "$RESULTS" | tee "$RESULTS/summary.md"
log "results in $RESULTS"
