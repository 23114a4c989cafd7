# Shared helpers for the benchmark scripts (sourced, not executed).
# shellcheck shell=bash

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# Install the Debian packages the benchmark needs, only when something is missing.
# With arguments, only those (restic borg python3 zstd time postgresql runuser);
# without, all of them.
ensure_packages() {
    local want=("$@") missing=() w
    [ ${#want[@]} -gt 0 ] || want=(restic borg python3 zstd time postgresql runuser)
    for w in "${want[@]}"; do
        case $w in
            restic) command -v restic >/dev/null || missing+=(restic) ;;
            borg) command -v borg >/dev/null || missing+=(borgbackup) ;;
            python3) command -v python3 >/dev/null || missing+=(python3) ;;
            zstd) command -v zstd >/dev/null || missing+=(zstd) ;;
            time) [ -x /usr/bin/time ] || missing+=(time) ;;
            postgresql) ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || missing+=(postgresql) ;;
            runuser) command -v runuser >/dev/null || missing+=(util-linux) ;;
            *) die "ensure_packages: no rule for '$w'" ;;
        esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing packages ${missing[*]} and not root to install them"
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    [ -n "$d" ] || die "no PostgreSQL binaries under /usr/lib/postgresql"
    printf '%s\n' "$d"
}

as_postgres() { runuser -u postgres -- "$@"; }

PG_DATA=""
PG_SOCK=""

# Start a PostgreSQL server on DATADIR, listening on a unix socket only.
pg_start() {
    PG_DATA=$1
    local bin
    bin=$(pg_bindir)
    PG_SOCK=$(mktemp -d /tmp/ferry-bench-pg.XXXXXX)
    chown postgres: "$PG_SOCK"
    as_postgres "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_SOCK/server.log" -w -t 120 \
        -o "-c listen_addresses= -k $PG_SOCK" start >/dev/null \
        || { cat "$PG_SOCK/server.log" >&2 || true; die "postgres did not start on $PG_DATA"; }
    local deadline=$((SECONDS + 60))
    until as_postgres "$bin/pg_isready" -q -h "$PG_SOCK"; do
        [ $SECONDS -lt $deadline ] || die "postgres on $PG_DATA not ready after 60 s"
        sleep 0.2
    done
}

# Stop the server started by pg_start (fast shutdown: a clean checkpoint).
pg_stop() {
    [ -n "$PG_DATA" ] || return 0
    local bin
    bin=$(pg_bindir)
    if [ -f "$PG_DATA/postmaster.pid" ]; then
        as_postgres "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 120 stop >/dev/null || true
    fi
    rm -rf "$PG_SOCK"
    PG_DATA=""
    PG_SOCK=""
}

# Check that the postgres user can reach DIR (every parent must be searchable).
check_postgres_can_reach() {
    as_postgres test -x "$1" \
        || die "the postgres user cannot enter $1: make its parent directories searchable (chmod o+x)"
}

# Bytes of a tree as a backup tool sees it: apparent sizes of all entries.
tree_bytes() { du -sb --apparent-size "$1" | cut -f1; }
