#!/usr/bin/env python3
"""Helpers of bench/downtime.sh.

  downtime.py poll SOCKET_DIR OUT [AGENT_PID]
      Probes PostgreSQL every 20 ms until SIGTERM, the way pg_isready does
      (exit codes 0 up, 1 rejecting, 2 no answer) but without a fork; one
      line per probe in OUT: start_ns end_ns code [rchar wchar of AGENT_PID].
  downtime.py probe SOCKET_DIR
      One probe; exits with its code.
  downtime.py outage OUT [SINCE_NS]
      The longest unavailable interval of a probe file, as JSON: from the
      start of its first failed probe to the start of the first probe that
      succeeded after it (so its error is about one probe interval).
  downtime.py record two-pass|baseline RUN_DIR RUN [AGENT_LOG]
      One JSON line for a run, from the files bench/downtime.sh left in
      RUN_DIR (times, probes, pgbench.log, and backup.json + show.json or
      snapshot.json).
  downtime.py summary RAW.jsonl
      The summary table (markdown) of a run of bench/downtime.sh.
"""
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

PERIOD_S = 0.020


STARTUP = b"user\0postgres\0database\0postgres\0\0"


def probe(sock_path):
    """What pg_isready (libpq's PQping) says, without a fork: 0 accepting
    connections, 1 rejecting them (starting up or shutting down), 2 no
    answer. Connects over the unix socket, logs in (trust) and leaves."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(sock_path)
        s.sendall(struct.pack("!ii", 8 + len(STARTUP), 196608) + STARTUP)
        buf = b""
        while True:
            while len(buf) < 5:
                more = s.recv(4096)
                if not more:
                    return 2
                buf += more
            kind, length = buf[:1], struct.unpack("!i", buf[1:5])[0]
            while len(buf) < 1 + length:
                more = s.recv(4096)
                if not more:
                    return 2
                buf += more
            body, buf = buf[5 : 1 + length], buf[1 + length :]
            if kind == b"E":
                # SQLSTATE 57P03: cannot connect now; any other error means
                # the server answers (as PQping counts it)
                fields = {f[:1]: f[1:] for f in body.split(b"\0") if f}
                return 1 if fields.get(b"C") == b"57P03" else 0
            if kind == b"Z":
                s.sendall(b"X\0\0\0\4")
                return 0
    except OSError:
        return 2
    finally:
        s.close()


def poll(sock_dir, out, agent_pid=None):
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sock_path = os.path.join(sock_dir, ".s.PGSQL.5432")
    io_path = f"/proc/{agent_pid}/io" if agent_pid else None
    with open(out, "w", buffering=1) as f:
        next_at = time.monotonic()
        while not stop:
            t0 = time.time_ns()
            rc = probe(sock_path)
            t1 = time.time_ns()
            extra = ""
            if io_path:
                try:
                    io = dict(l.split(": ") for l in open(io_path).read().splitlines())
                    extra = f" {io['rchar']} {io['wchar']}"
                except (OSError, KeyError, ValueError):
                    extra = " - -"
            f.write(f"{t0} {t1} {rc}{extra}\n")
            next_at += PERIOD_S
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()


def outage(path, since_ns=0):
    probes = []
    for line in open(path):
        p = line.split()
        if len(p) < 3:
            continue  # a line cut by the poller's end
        io = (int(p[3]), int(p[4])) if len(p) >= 5 and p[3] != "-" else None
        probes.append((int(p[0]), int(p[1]), int(p[2]), io))
    probes = [p for p in probes if p[0] >= since_ns]
    r = {"probes": len(probes), "outages": 0, "downtime_ms": None}
    if len(probes) < 2:
        r["error"] = "too few probes"
        return r
    gaps = [b[0] - a[0] for a, b in zip(probes, probes[1:])]
    r["probe_interval_ms"] = {
        "median": round(statistics.median(gaps) / 1e6, 1),
        "max": round(max(gaps) / 1e6, 1),
    }
    r["probe_ms_max"] = round(max(p[1] - p[0] for p in probes) / 1e6, 1)
    if probes[0][2] != 0:
        r["error"] = "PostgreSQL was not ready when polling began"
    best = None
    i = 0
    while i < len(probes):
        if probes[i][2] == 0:
            i += 1
            continue
        j = i
        while j < len(probes) and probes[j][2] != 0:
            j += 1
        r["outages"] += 1
        if j == len(probes):
            r["error"] = "PostgreSQL was not ready again when polling ended"
            break
        length = probes[j][0] - probes[i][0]
        if best is None or length > best[0]:
            best = (length, i, j)
        i = j
    if best is None:
        r["downtime_ms"] = 0
        return r
    length, i, j = best
    r["downtime_ms"] = round(length / 1e6, 1)
    r["down_ns"] = probes[i][0]
    r["up_ns"] = probes[j][0]
    # what the agent read and wrote while PostgreSQL was down
    if probes[i][3] and probes[j][3]:
        r["agent_read_during_bytes"] = probes[j][3][0] - probes[i][3][0]
        r["agent_written_during_bytes"] = probes[j][3][1] - probes[i][3][1]
    return r


def load_tps(log, start_ns, until_ns):
    """Median tps of pgbench's progress lines (-P 1) before until_ns."""
    limit = (until_ns - start_ns) / 1e9 if until_ns else float("inf")
    tps = []
    try:
        for line in open(log, errors="replace"):
            m = re.match(r"progress: ([0-9.]+) s, ([0-9.]+) tps", line)
            if m and float(m.group(1)) <= limit:
                tps.append(float(m.group(2)))
    except OSError:
        pass
    return round(statistics.median(tps), 1) if tps else None


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z\s+\w+\s+(.*)$")


def agent_phases(log, start_ns, end_ns):
    """The two-pass backup's phases as the agent logged them: pre-copy
    committed, stop done, start done (as soon as the delta pass has read
    every changed file), delta committed (its uploads drained)."""
    import datetime

    ev = []
    try:
        lines = open(log, errors="replace").read().splitlines()
    except OSError:
        return {}
    for line in lines:
        m = LOG_LINE.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if not m:
            continue
        t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
        ns = int(t.timestamp()) * 1_000_000_000 + int(float("0" + (m.group(2) or ".0")) * 1e9)
        if not start_ns <= ns <= end_ns:
            continue
        text = m.group(3)
        logged_stop = re.search(r"delta pass started stop_ms=(\d+)", text)
        if logged_stop:
            ev.append(("stop_ms", ns, int(logged_stop.group(1))))
        if "snapshot committed" in text:
            b = re.search(r"bytes_new=(\d+)", text)
            ev.append(("commit", ns, int(b.group(1)) if b else None))
        elif 'action="stop"' in text and "succeeded" in text:
            ev.append(("stop", ns, None))
        elif 'action="start"' in text and "succeeded" in text:
            ev.append(("start", ns, None))
    first = lambda kind, after=0: next((e for e in ev if e[0] == kind and e[1] >= after), None)
    pre = first("commit")
    stop = pre and first("stop", pre[1])
    start = stop and first("start", stop[1])
    delta = stop and first("commit", stop[1])
    stop_ms = stop and first("stop_ms", stop[1])
    if not (pre and stop and start and delta):
        return {"agent_log_events": [e[0] for e in ev]}
    ms = lambda a, b: (b - a) // 1_000_000
    return {
        "log_pre_copy_ms": ms(start_ns, pre[1]),
        # The stop command's time as the agent logged it (the pre_stop hook
        # runs before it, while the app still runs).
        "log_stop_ms": stop_ms[2] if stop_ms else ms(pre[1], stop[1]),
        # From the stop to the start command's success: the delta pass's
        # reading, then the start.
        "log_stop_to_start_ms": ms(stop[1], start[1]),
        # The delta's uploads drain after the start.
        "log_drain_after_start_ms": max(0, ms(start[1], delta[1])),
        "log_pre_copy_bytes_new": pre[2],
        "log_delta_bytes_new": delta[2],
    }


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def record(method, d, run, agent_log=None):
    t = {}
    for line in open(os.path.join(d, "times")):
        k, v = line.split()
        t[k] = int(v) if v.lstrip("-").isdigit() else v
    o = outage(os.path.join(d, "probes"))
    r = {"run": int(run), "method": method, "ok": t.get("ok") == "true"}
    r["observed_downtime_ms"] = o.get("downtime_ms")
    r["outages"] = o["outages"]
    r["probes"] = o["probes"]
    r["probe_interval_ms"] = o.get("probe_interval_ms")
    if o.get("error"):
        r["ok"] = False
        r["error"] = "poller: " + o["error"]
    elif o["outages"] != 1:
        r["warning"] = f"{o['outages']} unavailable intervals seen (the longest is taken)"
    r["load_tps"] = load_tps(os.path.join(d, "pgbench.log"), t.get("pgbench_start_ns", 0), o.get("down_ns"))
    if method == "two-pass":
        job = read_json(os.path.join(d, "backup.json")) or {}
        show = read_json(os.path.join(d, "show.json")) or {}
        if not r["ok"] and "error" not in r:
            r["error"] = job.get("reason") or "ferryctl app backup failed (backup.err)"
        r["job_id"] = job.get("id")
        r["backup_id"] = job.get("backup_id")
        r["ferry_downtime_ms"] = show.get("downtime_ms", job.get("downtime_ms"))
        r["ferry_total_ms"] = show.get("duration_ms")
        # The passes, as the backup records them.
        for k in ("pre_copy_ms", "delta_ms", "bytes_new", "delta_bytes_read"):
            r["ferry_" + k] = show.get(k)
        r["backup_bytes"] = show.get("bytes")
        r["backup_files"] = show.get("files")
        r["stopped"] = show.get("stopped")
        r["wall_ms"] = (t["end_ns"] - t["start_ns"]) // 1_000_000
        if o.get("down_ns"):
            r["observed_pre_copy_ms"] = (o["down_ns"] - t["start_ns"]) // 1_000_000
            r["observed_after_up_ms"] = (t["end_ns"] - o["up_ns"]) // 1_000_000
        if agent_log:
            r.update(agent_phases(agent_log, t["start_ns"], t["end_ns"]))
        r["agent_read_during_bytes"] = o.get("agent_read_during_bytes")
        r["agent_written_during_bytes"] = o.get("agent_written_during_bytes")
    else:
        snap = read_json(os.path.join(d, "snapshot.json")) or {}
        if not r["ok"] and "error" not in r:
            r["error"] = t.get("error", "failed")
        r["stop_ms"] = (t["stopped_ns"] - t["stop_ns"]) // 1_000_000 if "stopped_ns" in t else None
        r["copy_ms"] = (t["copied_ns"] - t["stopped_ns"]) // 1_000_000 if "copied_ns" in t else None
        r["start_ms"] = (t["started_ns"] - t["copied_ns"]) // 1_000_000 if "started_ns" in t else None
        r["script_downtime_ms"] = (t["started_ns"] - t["stop_ns"]) // 1_000_000 if "started_ns" in t else None
        for k in ("files", "bytes_total", "bytes_read", "bytes_new", "bytes_stored", "duration_s", "mib_per_s"):
            r["snapshot_" + k] = snap.get(k)
    print(json.dumps(r))


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summary(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    setup = next((r for r in rows if r.get("kind") == "setup"), {})
    runs = sorted({r["run"] for r in rows if "run" in r})
    by = {(r["run"], r["method"]): r for r in rows if "method" in r}

    def s(ms):
        return "–" if ms is None else f"{ms / 1000:.2f} s"

    def mib(b):
        return "–" if b is None else f"{b / 1048576:.1f} MiB"

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f} %"

    def row(n, v, fok, bok):
        ferry = (
            f"{s(v['rep'])} | {s(v['obs'])} | {s(v['pre'])} | {s(v['stop'])} / {s(v['delta'])} / {s(v['start'])} "
            f"| {mib(v['rd'])} / {mib(v['new'])}"
            if fok
            else "failed | | | |"
        )
        base = f"{s(v['base'])} | {s(v['bstop'])} / {s(v['copy'])} / {s(v['bstart'])}" if bok else "failed |"
        return f"| {n} | {ferry} | {base} | {pct(v['ro'])} | {pct(v['rr'])} |"

    out = []
    if setup:
        out.append(
            f"PostgreSQL {setup.get('postgres', '?')}, pgbench scale {setup.get('scale')}: "
            f"data directory {mib(setup.get('pgdata_bytes'))} ({setup.get('pgdata_human', '?')} on disk); "
            f"load `pgbench {setup.get('pgbench_args', '')}`; page cache dropped before each backup: "
            f"{'yes' if setup.get('drop_caches') else 'no (not root)'}; pre-stop hook: "
            f"{setup.get('pre_stop', 'none')}; binaries {setup.get('bin_dir')} "
            f"({setup.get('build', '?')} build, commit {setup.get('commit', '?')})."
        )
        out.append("")
    out.append(
        "| run | Ferry downtime, reported | Ferry downtime, observed | pre-copy | Ferry stop / delta / start "
        "| delta: read / new | baseline downtime, observed | baseline stop / copy / start "
        "| ratio, observed | ratio, reported | load tps |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cols = {k: [] for k in ("rep", "obs", "pre", "stop", "delta", "start", "rd", "new", "base", "bstop", "copy", "bstart", "ro", "rr")}
    for n in runs:
        f = by.get((n, "two-pass"), {})
        b = by.get((n, "baseline"), {})
        fok, bok = f.get("ok"), b.get("ok")
        fo = f.get("observed_downtime_ms") if fok else None
        fr = f.get("ferry_downtime_ms") if fok else None
        bo = b.get("observed_downtime_ms") if bok else None
        vals = {
            "rep": fr,
            "obs": fo,
            "pre": f.get("ferry_pre_copy_ms", f.get("log_pre_copy_ms")) if fok else None,
            "stop": f.get("log_stop_ms") if fok else None,
            "delta": f.get("ferry_delta_ms") if fok else None,
            "start": (fr - f["log_stop_ms"] - f["ferry_delta_ms"]) if fok and fr is not None and f.get("log_stop_ms") is not None and f.get("ferry_delta_ms") is not None else None,
            "rd": f.get("ferry_delta_bytes_read", f.get("agent_read_during_bytes")) if fok else None,
            "new": f.get("log_delta_bytes_new") if fok else None,
            "base": bo,
            "bstop": b.get("stop_ms") if bok else None,
            "copy": b.get("copy_ms") if bok else None,
            "bstart": b.get("start_ms") if bok else None,
            "ro": fo / bo if fo is not None and bo else None,
            "rr": fr / bo if fr is not None and bo else None,
        }
        for k, v in vals.items():
            cols[k].append(v)
        tps = " / ".join(str(round(x["load_tps"])) if x.get("load_tps") else "–" for x in (f, b))
        out.append(row(n, vals, fok, bok) + f" {tps} |")
    m = {k: med(v) for k, v in cols.items()}
    out.append(row("median", m, True, True) + " |")
    out.append("")
    if m["ro"] is not None:
        verdict = "met" if max(m["ro"], m["rr"] or 0) <= 0.10 else "missed"
        out.append(
            f"Target: two-pass downtime ≤ 10 % of the single-pass downtime. Median ratio {pct(m['ro'])} observed, "
            f"{pct(m['rr'])} reported: {verdict}."
        )
    out.append("")
    out.append(
        "Observed = the longest interval in which PostgreSQL, probed every 20 ms from outside the way pg_isready "
        "probes it, did not accept connections. Reported = the backup's downtime_ms (`ferryctl backup show`: first "
        "stop until every stopped component runs again). Pre-copy and Ferry's stop / delta / start come from the "
        "backup record and the agent's log; delta read = what the delta pass read "
        "(the backup record), new = the delta snapshot's new bytes. ratio = two-pass downtime / baseline observed "
        "downtime. load tps = pgbench's median tps before the stop (two-pass / baseline)."
    )
    print("\n".join(out))


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "poll" and len(sys.argv) in (4, 5):
        poll(*sys.argv[2:4], sys.argv[4] if len(sys.argv) == 5 else None)
    elif cmd == "probe" and len(sys.argv) == 3:
        sys.exit(probe(os.path.join(sys.argv[2], ".s.PGSQL.5432")))
    elif cmd == "outage" and len(sys.argv) in (3, 4):
        since = int(sys.argv[3]) if len(sys.argv) == 4 else 0
        print(json.dumps(outage(sys.argv[2], since)))
    elif cmd == "record" and len(sys.argv) in (5, 6) and sys.argv[2] in ("two-pass", "baseline"):
        record(*sys.argv[2:])
    elif cmd == "summary" and len(sys.argv) == 3:
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
