#!/usr/bin/env bash
# Mutate about 1% of a dataset made by dataset.sh.
#
#   bench/mutate.sh DIR [SEED]
#
# Appends to 1% of the small files, deletes 20 and adds 50, appends ~4 MiB
# to five logs, rewrites a 4 MiB range in the largest media file, adds a
# 4 MiB media file, fills one more extent of the disk image, and runs 200
# pgbench transactions against the PostgreSQL data directory.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: mutate.sh DIR [SEED]"
DIR=$(cd "$1" 2>/dev/null && pwd) || die "dataset directory $1 does not exist"
SEED=${2:-1}
[[ $SEED =~ ^[0-9]+$ ]] || die "seed '$SEED' is not a non-negative integer"
[ -d "$DIR/app/docs" ] && [ -f "$DIR/pgdata/PG_VERSION" ] \
    || die "$DIR does not look like a dataset made by dataset.sh"
[ "$(id -u)" = 0 ] || die "mutate.sh runs as root (it runs PostgreSQL as the postgres user)"

trap 'pg_stop' EXIT

python3 "$BENCH_DIR/files.py" mutate "$DIR" "$SEED"

BIN=$(pg_bindir)
check_postgres_can_reach "$DIR"
pg_start "$DIR/pgdata"
as_postgres "$BIN/pgbench" -h "$PG_SOCK" -U postgres -n -c 1 -t 200 postgres >/dev/null
pg_stop
