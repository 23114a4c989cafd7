#!/usr/bin/env bash
# The controller's memory with a fleet of simulated agents.
#
#   bench/fleet.sh [AGENTS] [ROUNDS]   (default 5000 agents, 2 rounds)
#
# Builds the release controller and the fleet_bench example
# (tests/examples/fleet_bench.rs), which starts `ferry-controller serve`,
# enrols AGENTS agents through the real join RPC (one certificate each),
# opens one real mTLS session per agent (hello, a one-app inventory,
# heartbeats every 10 s), pings every agent through its link, then
# disconnects them all. Prints one JSON object with the controller's RSS
# (VmRSS, from /proc) at each stage, its peak (VmHWM), and the RSS per
# online agent; also written to ~/.cache/ferry-bench/results/fleet-<time>.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)
AGENTS=${1:-5000}
TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}

# One fd per session on each side, plus the controller's own.
need=$((AGENTS + 1000))
if [ "$(ulimit -n)" -lt "$need" ]; then
    ulimit -n "$need" 2>/dev/null || die "need $need open files (ulimit -n); the hard limit is $(ulimit -Hn)"
fi

log "building the release controller and fleet_bench"
(cd "$REPO_ROOT" && cargo build --release -q -p ferry-controller --bins \
    && cargo build --release -q -p ferry-tests --example fleet_bench) || die "cargo build failed"

out=${FERRY_BENCH_RESULTS:-$HOME/.cache/ferry-bench/results}
mkdir -p "$out"
file="$out/fleet-$(date +%Y%m%d-%H%M%S).json"
log "running $AGENTS simulated agents"
FERRY_BIN_DIR="$TARGET/release" "$TARGET/release/examples/fleet_bench" "$AGENTS" "${2:-2}" | tee "$file"
log "results in $file"
