#!/usr/bin/env python3
"""Summarise a bench/run.sh results directory.

    report.py RESULTS_DIR

Reads raw.jsonl and machine.json, prints a markdown report (medians over the
runs, ratios against the targets) and writes summary.json next to them.
"""

import json
import os
import statistics
import sys

MIB = 1 << 20
BASE_STEPS = ["initial", "incremental", "nochange", "restore"]
MODES = ["cold", "warm"]
STEPS = ["%s_%s" % (s, m) for m in MODES for s in BASE_STEPS]
TOOLS = ["ferry", "restic", "rustic", "borg"]
PEERS = ["restic", "rustic", "borg"]


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, spec=".1f", none="—"):
    return none if x is None else format(x, spec)


def verdict(ok, info=False):
    if info:
        return ""
    if ok is None:
        return "not measured"
    return "met" if ok else "**missed**"


def summarise(rows, scale):
    rows = [r for r in rows if str(r.get("scale")) == scale]
    ds = [r for r in rows if r.get("step") == "dataset"]
    out = {"scale": scale, "runs": len({r["run"] for r in ds}),
           "dataset_bytes": median([r["bytes"] for r in ds]),
           "dataset_allocated_bytes": median([r["allocated_bytes"] for r in ds]),
           "dataset_entries": median([r["entries"] for r in ds]),
           "tools": {}, "machine": {}}

    def sel(tool, step):
        return [r for r in rows if r.get("tool") == tool and r.get("step") == step]

    for step in ("disk_read", "disk_read_par", "cpu_dry_run", "ref_zstd"):
        ok = [r for r in sel("machine", step) if r.get("ok")]
        if ok:
            secs = median([r["seconds"] for r in ok])
            mibs = median([r["bytes"] / MIB / r["seconds"] for r in ok if r["seconds"] > 0])
            cpu = median([r["bytes"] / MIB / (r["user_s"] + r["sys_s"]) for r in ok
                           if r["user_s"] + r["sys_s"] > 0])
            out["machine"][step] = {"seconds": secs, "mib_s": mibs, "n": len(ok),
                                    "mib_per_cpu_s": cpu}
    dr, cpu = out["machine"].get("disk_read"), out["machine"].get("cpu_dry_run")
    out["machine"]["limit_mib_s"] = min(dr["mib_s"], cpu["mib_s"]) if dr and cpu else None

    for tool in TOOLS:
        t = {}
        for step in STEPS:
            rs = sel(tool, step)
            ok = [r for r in rs if r.get("ok")]
            if not rs:
                continue
            t[step] = {
                "n": len(ok), "failed": len(rs) - len(ok),
                "seconds": median([r["seconds"] for r in ok]),
                "mib_s": median([r["bytes"] / MIB / r["seconds"] for r in ok if r["seconds"] > 0]),
                "rss_mib": median([r["rss_kib"] / 1024 for r in ok]),
                "rss_max_mib": max([r["rss_kib"] / 1024 for r in ok], default=None),
                "cpu_pct": median([100 * (r["user_s"] + r["sys_s"]) / r["seconds"]
                                   for r in ok if r["seconds"] > 0]),
                "cpu_s": median([r["user_s"] + r["sys_s"] for r in ok]),
                "load1": median([r["load1"] for r in ok]),
                "sync_s": median([r["sync_s"] for r in ok if "sync_s" in r]),
            }
        if not t:
            continue
        rs = sel(tool, "repo_size")
        t["repo_bytes"] = median([r["bytes"] for r in rs])
        chk = sel(tool, "restore_check")
        t["restore_diff_lines_max"] = max([r["manifest_diff_lines"] for r in chk], default=None)
        t["restore_allocated_bytes"] = median([r["allocated_bytes"] for r in chk])
        peaks = [v["rss_max_mib"] for k, v in t.items() if k in STEPS and v.get("rss_max_mib")]
        t["peak_rss_mib"] = max(peaks) if peaks else None
        out["tools"][tool] = t
    return out


def targets(s):
    """Ferry against the best peer of each step, per cache mode."""
    f = s["tools"].get("ferry", {})
    peers = {p: s["tools"][p] for p in PEERS if p in s["tools"]}

    def step(t, k, field="seconds"):
        return t.get(k, {}).get(field)

    def best(k):
        xs = [(step(t, k), p) for p, t in peers.items() if step(t, k)]
        return min(xs) if xs else (None, None)

    res = []
    for mode in MODES:
        if not step(f, "initial_" + mode):
            continue
        for base, goal, ok in (
            ("initial", "≥ 2.5× faster", lambda x: x >= 2.5),
            ("incremental", "≤ 0.5× the time", lambda x: x <= 0.5),
            ("nochange", "≤ 0.35× the time", lambda x: x <= 0.35),
            ("restore", "≥ 1.5× faster", lambda x: x >= 1.5),
        ):
            k = "%s_%s" % (base, mode)
            b, who = best(k)
            fs = step(f, k)
            if base in ("initial", "restore"):
                x = b / fs if b and fs else None
                shown = fmt(x, ".2f") + "×" if x else "—"
            else:
                x = fs / b if b and fs else None
                shown = fmt(x, ".2f") + "× the time" if x else "—"
            res.append(("%s backup (%s cache) vs best peer (%s)" % (base, mode, who)
                        if base != "restore" else "restore (%s cache) vs best peer (%s)" % (mode, who),
                        goal, shown, None if x is None else ok(x)))
        par = s["machine"].get("disk_read_par")
        fm = step(f, "initial_" + mode, "mib_s")
        if mode == "cold" and par and fm:
            x = fm / par["mib_s"]
            res.append(("initial backup (cold) vs the disk's cold read with 8 readers (%.0f MiB/s)"
                        % par["mib_s"], "≥ 60%", fmt(100 * x, ".0f") + "%", x >= 0.6))
    for k in ("initial", "restore"):
        rss = max([step(f, "%s_%s" % (k, m), "rss_max_mib") or 0 for m in MODES]) or None
        res.append(("peak RSS of %s" % ("backup" if k == "initial" else "restore"), "≤ 100 MiB",
                    fmt(rss, ".0f") + " MiB" if rss else "—", None if rss is None else rss <= 100))
    r = s["tools"].get("restic", {})
    x = f.get("repo_bytes") / r["repo_bytes"] if f.get("repo_bytes") and r.get("repo_bytes") else None
    # Not a target of the data mover issues: shown for reference.
    res.append(("repository size vs restic", "(info)", fmt(x, ".3f") + "×" if x else "—", None))
    return res


def report(d):
    rows = [json.loads(line) for line in open(os.path.join(d, "raw.jsonl")) if line.strip()]
    machine = json.load(open(os.path.join(d, "machine.json")))
    scales = sorted({str(r["scale"]) for r in rows if "scale" in r}, key=float)
    sums = [summarise(rows, s) for s in scales]
    p = print
    p("# Ferry benchmark results\n")
    p("Machine: %s, %s cores, %s RAM, kernel %s, filesystem %s on %s (%s); page cache dropped "
      "before the disk read: %s." % (
          machine.get("cpu_model"), machine.get("cores"), machine.get("mem_total"),
          machine.get("kernel"), machine.get("filesystem"), machine.get("disk_device"),
          machine.get("disk_model"), "yes" if machine.get("drop_caches") else "no (warm)"))
    p("Versions: %s; %s; %s; ferry-agent %s (commit %s).\n" % (
        machine.get("restic"), machine.get("rustic") or "rustic not run", machine.get("borg"),
        machine.get("ferry") or "not run",
        machine.get("ferry_commit")))
    for s in sums:
        p("## Scale %s: %.2f GiB (%d entries, %.2f GiB allocated), median of %d runs\n" % (
            s["scale"], (s["dataset_bytes"] or 0) / (1 << 30), s["dataset_entries"] or 0,
            (s["dataset_allocated_bytes"] or 0) / (1 << 30), s["runs"]))
        m = s["machine"]
        dr, cpu, z = m.get("disk_read"), m.get("cpu_dry_run"), m.get("ref_zstd")
        par = m.get("disk_read_par")
        p("Machine limit: cold disk read %s MiB/s with 2 readers, %s MiB/s with 8; "
          "`ferry-agent snapshot create --dry-run` (warm) %s MiB/s "
          "→ limit %s MiB/s. The dry run costs %s MiB per CPU-second (so %s MiB/s on two idle "
          "cores); reference `tar | zstd -T2 -3`: %s MiB/s.\n" % (
              fmt(dr and dr["mib_s"], ".0f"), fmt(par and par["mib_s"], ".0f"),
              fmt(cpu and cpu["mib_s"], ".0f"),
              fmt(m.get("limit_mib_s"), ".0f"), fmt(cpu and cpu["mib_per_cpu_s"], ".0f"),
              fmt(cpu and cpu["mib_per_cpu_s"] and 2 * cpu["mib_per_cpu_s"], ".0f"),
              fmt(z and z["mib_s"], ".0f")))
        p("| tool | step | seconds | MiB/s | peak RSS MiB | CPU s | CPU % | then sync s | load1 | failed |")
        p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for tool, t in s["tools"].items():
            for step in STEPS:
                v = t.get(step)
                if not v:
                    continue
                p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    tool, step, fmt(v["seconds"], ".2f"), fmt(v["mib_s"], ".0f"),
                    fmt(v["rss_mib"], ".0f"), fmt(v["cpu_s"], ".1f"), fmt(v["cpu_pct"], ".0f"),
                    fmt(v["sync_s"], ".1f"),
                    fmt(v["load1"], ".1f"), v["failed"] or ""))
        p("")
        p("| tool | repository MiB | peak RSS MiB (any step) | restore matches source | restored allocated MiB |")
        p("|---|---:|---:|---|---:|")
        for tool, t in s["tools"].items():
            dl = t.get("restore_diff_lines_max")
            p("| %s | %s | %s | %s | %s |" % (
                tool, fmt(t.get("repo_bytes") and t["repo_bytes"] / MIB, ".0f"),
                fmt(t.get("peak_rss_mib"), ".0f"),
                "—" if dl is None else ("yes" if dl == 0 else "no (%d manifest lines differ)" % dl),
                fmt(t.get("restore_allocated_bytes") and t["restore_allocated_bytes"] / MIB, ".0f")))
        p("")
        s["targets"] = [{"target": a, "goal": b, "measured": c, "met": d} for a, b, c, d in targets(s)]
        p("| target | goal | measured | |")
        p("|---|---|---|---|")
        for t in s["targets"]:
            p("| %s | %s | %s | %s |" % (t["target"], t["goal"], t["measured"],
                                         verdict(t["met"], t["goal"] == "(info)")))
        p("")
    if len(sums) >= 2:
        a, b = sums[0], sums[-1]
        p("## Peak RSS when the dataset grows (scale %s → %s)\n" % (a["scale"], b["scale"]))
        p("| tool | peak RSS MiB at %s | at %s | ratio |" % (a["scale"], b["scale"]))
        p("|---|---:|---:|---:|")
        for tool in TOOLS:
            x = a["tools"].get(tool, {}).get("peak_rss_mib")
            y = b["tools"].get(tool, {}).get("peak_rss_mib")
            p("| %s | %s | %s | %s |" % (tool, fmt(x, ".0f"), fmt(y, ".0f"),
                                         fmt(y / x if x and y else None, ".2f")))
        p("")
    json.dump({"machine": machine, "scales": sums}, open(os.path.join(d, "summary.json"), "w"), indent=2)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS_DIR")
    report(sys.argv[1])
