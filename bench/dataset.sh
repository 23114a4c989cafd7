#!/usr/bin/env bash
# Generate the benchmark dataset: ~1.5 GiB per SCALE unit.
#
#   bench/dataset.sh DIR [SCALE]
#
# DIR must not exist or be empty. SCALE (default 1) multiplies every part;
# SCALE=2 doubles the dataset. Contents:
#   pgdata/      PostgreSQL data directory filled by `pgbench -i -s 36*SCALE`
#   app/docs/    ~40k small JSON and text files per scale unit
#   app/logs/    ~300 MiB of compressible log lines per scale unit
#   media/       ~300 MiB of incompressible (random) data per scale unit
#   disk/        sparse files (128 MiB apparent, ~7 MiB of data, per unit)
#   links/       symlinks (relative, absolute, dangling, to a directory) and hard links
# Everything but PostgreSQL's page layout is seeded and deterministic.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: dataset.sh DIR [SCALE]"
DIR=$1
SCALE=${2:-1}
[[ $SCALE =~ ^[0-9]+(\.[0-9]+)?$ ]] && python3 -c "import sys; sys.exit(not float('$SCALE') > 0)" \
    || die "scale '$SCALE' is not a positive number"
if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR")" ]; then
    die "dataset directory $DIR is not empty; refusing to write into it"
fi
[ "$(id -u)" = 0 ] || die "dataset.sh runs as root (it runs PostgreSQL as the postgres user and sets file owners)"

ensure_packages
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
chmod 755 "$DIR"
check_postgres_can_reach "$DIR"

trap 'pg_stop' EXIT

log "generating files in $DIR (scale $SCALE)"
python3 "$BENCH_DIR/files.py" generate "$DIR" "$SCALE"

PGSCALE=$(python3 -c "print(max(1, round(36 * $SCALE)))")
log "filling PostgreSQL with pgbench scale $PGSCALE"
BIN=$(pg_bindir)
install -d -o postgres -g postgres -m 700 "$DIR/pgdata"
as_postgres "$BIN/initdb" -D "$DIR/pgdata" -U postgres --auth=trust --locale=C -E UTF8 >/dev/null
# keep WAL bounded so the data directory is mostly table and index pages
printf '%s\n' "max_wal_size = 128MB" "min_wal_size = 32MB" >>"$DIR/pgdata/postgresql.conf"
pg_start "$DIR/pgdata"
as_postgres "$BIN/pgbench" -h "$PG_SOCK" -U postgres -i -q -s "$PGSCALE" postgres 2>&1 | tail -n1 >&2
as_postgres "$BIN/psql" -h "$PG_SOCK" -U postgres -qAt -c "checkpoint" postgres >/dev/null
pg_stop

log "dataset ready: $(tree_bytes "$DIR") bytes, $(find "$DIR" | wc -l) entries"
