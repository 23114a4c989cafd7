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
STEPS = ["initial", "incremental", "nochange", "restore"]
TOOLS = ["ferry", "restic", "borg"]


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

    for step in ("disk_read", "cpu_dry_run", "ref_zstd"):
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
    f, r = s["tools"].get("ferry", {}), s["tools"].get("restic", {})

    def step(t, k, field="seconds"):
        return t.get(k, {}).get(field)

    def ratio(a, b):
        return a / b if a and b else None

    res = []
    x = ratio(step(r, "initial"), step(f, "initial"))
    res.append(("initial backup throughput vs restic", "≥ 1.5×", fmt(x, ".2f") + "×" if x else "—",
                None if x is None else x >= 1.5))
    x = ratio(step(r, "initial", "cpu_s"), step(f, "initial", "cpu_s"))
    res.append(("initial backup CPU cost vs restic (restic CPU s / Ferry CPU s)", "(info)",
                fmt(x, ".2f") + "×" if x else "—", None))
    x = ratio(step(r, "nochange"), step(f, "nochange"))
    res.append(("no-change backup speed vs restic", "≥ 2×", fmt(x, ".2f") + "×" if x else "—",
                None if x is None else x >= 2))
    x = ratio(step(r, "restore"), step(f, "restore"))
    res.append(("restore throughput vs restic", "≥ 1.5×", fmt(x, ".2f") + "×" if x else "—",
                None if x is None else x >= 1.5))
    x = ratio(f.get("repo_bytes"), r.get("repo_bytes"))
    res.append(("repository size vs restic", "≤ 1.0×", fmt(x, ".3f") + "×" if x else "—",
                None if x is None else x <= 1.0))
    x = ratio(f.get("peak_rss_mib"), r.get("peak_rss_mib"))
    res.append(("peak RSS vs restic", "≤ 1.0×", fmt(x, ".2f") + "×" if x else "—",
                None if x is None else x <= 1.0))
    lim = s["machine"].get("limit_mib_s")
    x = ratio(step(f, "initial", "mib_s"), lim)
    res.append(("initial backup throughput vs machine limit", "≥ 60%",
                fmt(100 * x, ".0f") + "%" if x else "—", None if x is None else x >= 0.6))
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
    p("Versions: %s; %s; ferry-agent %s (commit %s).\n" % (
        machine.get("restic"), machine.get("borg"), machine.get("ferry") or "not run",
        machine.get("ferry_commit")))
    for s in sums:
        p("## Scale %s: %.2f GiB (%d entries, %.2f GiB allocated), median of %d runs\n" % (
            s["scale"], (s["dataset_bytes"] or 0) / (1 << 30), s["dataset_entries"] or 0,
            (s["dataset_allocated_bytes"] or 0) / (1 << 30), s["runs"]))
        m = s["machine"]
        dr, cpu, z = m.get("disk_read"), m.get("cpu_dry_run"), m.get("ref_zstd")
        p("Machine limit: disk read %s MiB/s, `ferry-agent snapshot create --dry-run` (warm) %s MiB/s "
          "→ limit %s MiB/s. The dry run costs %s MiB per CPU-second (so %s MiB/s on two idle "
          "cores); reference `tar | zstd -T2 -3`: %s MiB/s.\n" % (
              fmt(dr and dr["mib_s"], ".0f"), fmt(cpu and cpu["mib_s"], ".0f"),
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
        p("| target (Ferry vs restic) | goal | measured | |")
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
