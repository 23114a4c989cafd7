#!/usr/bin/env bash
# The data mover's edge cases against its peers, in one run on this machine:
#
#   bench/extras.sh [--tools "ferry restic rustic borg"] [--files N]
#                   [--only sparse|small] [--work DIR] [--ferry-bin PATH]
#
# - sparse: one 64 GiB sparse file holding 4 MiB of data in four places;
#   each tool backs it up and restores it (cold page cache), and the restore
#   is checked: size, allocated bytes, and the data at each place.
# - small: N small files (default 1,000,000, 0–4 KiB, 1000 directories);
#   each tool backs them up and restores them (cold page cache); the restore
#   is checked by file count and total size.
# Every step runs under /usr/bin/time: wall seconds and peak RSS. Results go
# to stdout as a markdown table and to ~/.cache/ferry-bench/extras-<time>.jsonl.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)

TOOLS="ferry restic rustic borg"
FILES=1000000
ONLY=""
WORK=${FERRY_BENCH_WORK:-/var/tmp/ferry-bench}
FERRY_BIN=""
while [ $# -gt 0 ]; do
    case $1 in
        --tools) TOOLS=${2:?}; shift 2 ;;
        --files) FILES=${2:?}; shift 2 ;;
        --only) ONLY=${2:?}; shift 2 ;;
        --work) WORK=${2:?}; shift 2 ;;
        --ferry-bin) FERRY_BIN=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ "$(id -u)" = 0 ] || die "extras.sh runs as root (drop_caches)"
ensure_packages
if [ -z "$FERRY_BIN" ]; then
    (cd "$REPO_ROOT" && cargo build --release -q -p ferry-agent) || die "cargo build failed"
    FERRY_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/ferry-agent
fi
RUSTIC=$(command -v rustic || echo "${XDG_CACHE_HOME:-$HOME/.cache}/ferry-bench/rustic/bin/rustic")
[[ " $TOOLS " != *" rustic "* ]] || [ -x "$RUSTIC" ] || die "no rustic: run bench/run.sh once (it installs it) or drop it from --tools"

OUT=${XDG_CACHE_HOME:-$HOME/.cache}/ferry-bench/extras-$(date +%Y%m%d-%H%M%S).jsonl
mkdir -p "$WORK" "$(dirname "$OUT")"
T=$(mktemp -d "$WORK/extras.XXXXXX")
trap 'rm -rf "$T"' EXIT
PW=$(head -c 24 /dev/urandom | base64)
export RESTIC_PASSWORD=$PW RUSTIC_PASSWORD=$PW BORG_PASSPHRASE=$PW FERRY_REPO_PASSWORD=$PW
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# run CASE TOOL STEP CMD…: timed, cold cache; prints and records the figures
run() {
    local case=$1 tool=$2 step=$3
    shift 3
    drop
    if ! /usr/bin/time -f '%e %M' -o "$T/time" "$@" >"$T/out" 2>&1; then
        log "$tool $case $step failed:"; tail -n 5 "$T/out" >&2
        echo "{\"case\":\"$case\",\"tool\":\"$tool\",\"step\":\"$step\",\"ok\":false}" >>"$OUT"
        return 1
    fi
    read -r secs rss <"$T/time"
    echo "{\"case\":\"$case\",\"tool\":\"$tool\",\"step\":\"$step\",\"ok\":true,\"seconds\":$secs,\"rss_kib\":$rss}" >>"$OUT"
    printf '| %s | %s | %s | %s s | %s MiB |\n' "$case" "$tool" "$step" "$secs" "$((rss / 1024))"
}

init() { # TOOL REPO
    case $1 in
        ferry) FERRY_REPO=$2 "$FERRY_BIN" repo init ;;
        restic) restic -q -r "$2" init --repository-version 2 ;;
        rustic) "$RUSTIC" --no-progress -r "$2" --cache-dir "$T/rustic-cache" init ;;
        borg) borg init -e repokey "$2" ;;
    esac >/dev/null 2>&1
}
backup() { # TOOL REPO SRC
    cd "$3"
    case $1 in
        ferry) FERRY_REPO=$2 exec "$FERRY_BIN" snapshot create "$3" ;;
        restic) exec restic -q -r "$2" --cache-dir "$T/restic-cache" backup --compression auto . ;;
        rustic) exec "$RUSTIC" --no-progress -r "$2" --cache-dir "$T/rustic-cache" backup . ;;
        borg) exec borg create --compression zstd,3 "$2::a" . ;;
    esac
}
restore() { # TOOL REPO TARGET
    mkdir -p "$3"
    cd "$3"
    case $1 in
        ferry) FERRY_REPO=$2 exec "$FERRY_BIN" snapshot restore latest --target "$3" ;;
        restic) exec restic -q -r "$2" --cache-dir "$T/restic-cache" restore latest --target "$3" ;;
        rustic) exec "$RUSTIC" --no-progress -r "$2" --cache-dir "$T/rustic-cache" restore latest "$3" ;;
        borg) exec borg extract --sparse "$2::a" ;;
    esac
}
export -f backup restore
export FERRY_BIN RUSTIC T

echo "| case | tool | step | time | peak RSS |"
echo "|---|---|---|---:|---:|"

if [ -z "$ONLY" ] || [ "$ONLY" = sparse ]; then
    src=$T/sparse-src
    mkdir -p "$src"
    truncate -s 64G "$src/disk.img"
    for off in 0 17179869184 42949672960 68715282432; do
        head -c 1048576 /dev/urandom | dd of="$src/disk.img" bs=1M seek=$((off / 1048576)) conv=notrunc status=none
    done
    sums=$(for off in 0 16384 40960 65532; do dd if="$src/disk.img" bs=1M skip=$off count=1 status=none | sha256sum; done)
    for t in $TOOLS; do
        repo=$T/repo-sparse-$t target=$T/sparse-restore-$t
        init "$t" "$repo"
        run sparse "$t" backup bash -c 'backup "$@"' _ "$t" "$repo" "$src" || continue
        run sparse "$t" restore bash -c 'restore "$@"' _ "$t" "$repo" "$target" || continue
        f=$target/disk.img
        got=$(for off in 0 16384 40960 65532; do dd if="$f" bs=1M skip=$off count=1 status=none | sha256sum; done)
        size=$(stat -c %s "$f") alloc=$(($(stat -c %b "$f") * 512))
        [ "$got" = "$sums" ] && [ "$size" = 68719476736 ] || log "$t: sparse restore differs (size $size)"
        echo "{\"case\":\"sparse\",\"tool\":\"$t\",\"step\":\"check\",\"allocated\":$alloc,\"data_ok\":$([ "$got" = "$sums" ] && echo true || echo false)}" >>"$OUT"
        printf '| sparse | %s | restored allocation | %s MiB | |\n' "$t" "$((alloc >> 20))"
        rm -rf "$target" "$repo"
    done
    rm -rf "$src"
fi

if [ -z "$ONLY" ] || [ "$ONLY" = small ]; then
    src=$T/small-src
    log "creating $FILES small files"
    python3 - "$src" "$FILES" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
dirs = max(1, n // 1000)
for d in range(dirs):
    p = os.path.join(root, "d%04d" % d)
    os.makedirs(p)
    for i in range(n // dirs):
        with open(os.path.join(p, "f%04d" % i), "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(0, 4096)))
EOF
    want=$(find "$src" -type f | wc -l)
    for t in $TOOLS; do
        repo=$T/repo-small-$t target=$T/small-restore-$t
        init "$t" "$repo"
        run small "$t" backup bash -c 'backup "$@"' _ "$t" "$repo" "$src" || continue
        run small "$t" restore bash -c 'restore "$@"' _ "$t" "$repo" "$target" || continue
        got=$(find "$target" -type f | wc -l)
        [ "$got" = "$want" ] || log "$t: restored $got of $want files"
        rm -rf "$target" "$repo"
    done
    rm -rf "$src"
fi
log "results in $OUT"
