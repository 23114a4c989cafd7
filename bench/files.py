#!/usr/bin/env python3
"""Deterministic file-tree generator and mutator for the Ferry benchmark.

Used by bench/dataset.sh (generate) and bench/mutate.sh (mutate); the
PostgreSQL part of the dataset is handled by those scripts.

    files.py generate DIR SCALE
    files.py mutate DIR SEED
    files.py manifest DIR      (used by run.sh to check restores)

Every byte depends only on the seed and SCALE, so two machines generating
the same scale get the same tree (except timestamps and inode numbers).
"""

import hashlib
import json
import os
import random
import sys

MIB = 1 << 20

WORDS = (
    "ferry backup restore migrate volume snapshot chunk pack index manifest "
    "cluster agent controller storage tenant team application container pod "
    "service deployment statefulset replica schedule retention verify prune "
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
    "order invoice customer payment shipment warehouse product price amount "
    "the of and to in is it that for on with as was at by be this from or"
).split()

LEVELS = ["INFO"] * 12 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
COMPONENTS = ["http", "db", "worker", "scheduler", "auth", "cache", "queue"]
PATHS = ["/api/v1/orders", "/api/v1/users", "/healthz", "/metrics",
         "/api/v1/invoices", "/static/app.js", "/login", "/api/v1/search"]


def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def json_doc(rng, i):
    doc = {
        "id": i,
        "uuid": "%032x" % rng.getrandbits(128),
        "customer": {"name": sentence(rng, 2).title(),
                     "email": "user%d@example.com" % rng.randrange(10**6),
                     "tier": rng.choice(["free", "pro", "enterprise"])},
        "items": [{"sku": "SKU-%06d" % rng.randrange(10**6),
                   "qty": rng.randrange(1, 20),
                   "price": round(rng.uniform(1, 500), 2)}
                  for _ in range(rng.randrange(1, 40))],
        "notes": sentence(rng, rng.randrange(5, 120)),
        "created": 1_700_000_000 + rng.randrange(10**7),
    }
    return json.dumps(doc, indent=rng.choice([None, 2])).encode()


def text_doc(rng):
    paras = [sentence(rng, rng.randrange(20, 200)) for _ in range(rng.randrange(1, 10))]
    return ("\n\n".join(paras) + "\n").encode()


def log_lines(rng, start_ts, target_bytes):
    out = []
    size = 0
    ts = start_ts
    while size < target_bytes:
        ts += rng.randrange(0, 400)
        line = "%d.%03d %-5s [%s] req=%08x %s %s status=%d dur_ms=%d %s\n" % (
            ts // 1000, ts % 1000, rng.choice(LEVELS), rng.choice(COMPONENTS),
            rng.getrandbits(32), rng.choice(["GET", "POST", "PUT"]),
            rng.choice(PATHS), rng.choice([200, 200, 200, 201, 204, 404, 500]),
            rng.randrange(1, 3000), sentence(rng, rng.randrange(0, 8)))
        out.append(line)
        size += len(line)
    return "".join(out).encode(), ts


def generate(root, scale):
    rng = random.Random(0xF3A7 * 1000 + int(scale * 100))
    app = os.path.join(root, "app")
    docs = os.path.join(app, "docs")
    logs = os.path.join(app, "logs")
    media = os.path.join(root, "media")
    disk = os.path.join(root, "disk")
    links = os.path.join(root, "links")
    for d in (docs, logs, media, disk, links):
        os.makedirs(d, exist_ok=True)

    # many small JSON and text files: ~40k per scale unit, ~3 KiB on average
    n_small = int(40_000 * scale)
    per_dir = 100
    small = []
    for i in range(n_small):
        d = os.path.join(docs, "d%04d" % (i // per_dir))
        if i % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        if rng.random() < 0.6:
            p = os.path.join(d, "order-%06d.json" % i)
            write(p, json_doc(rng, i))
        else:
            p = os.path.join(d, "note-%06d.txt" % i)
            write(p, text_doc(rng), rng.choice([0o644, 0o600, 0o640]))
        small.append(p)

    # compressible logs: ~300 MiB per scale unit in 20 files
    n_logs = int(20 * scale)
    per_log = int(300 * MIB * scale) // n_logs
    ts = 1_700_000_000_000
    for i in range(n_logs):
        data, ts = log_lines(rng, ts, per_log)
        write(os.path.join(logs, "app-%03d.log" % i), data, 0o640)

    # incompressible media: ~300 MiB per scale unit, 12 files of 4..64 MiB
    sizes = [4, 8, 8, 12, 16, 16, 24, 24, 32, 40, 52, 64]
    reps = max(1, round(scale))
    for k in range(reps):
        for i, mib in enumerate(sizes):
            p = os.path.join(media, "clip-%d-%02d.bin" % (k, i))
            with open(p, "wb") as f:
                for _ in range(max(1, round(mib * scale / reps))):
                    f.write(rng.randbytes(MIB))

    # sparse files: a disk image with scattered data extents and two
    # mostly-empty preallocated-style files (holes stay holes)
    for k in range(reps):
        for name, apparent, extents in (("vm-%d.img" % k, 96 * MIB, 24),
                                        ("db-%d.sparse" % k, 16 * MIB, 4),
                                        ("tail-%d.sparse" % k, 16 * MIB, 0)):
            p = os.path.join(disk, name)
            with open(p, "wb") as f:
                f.truncate(apparent)
                for _ in range(extents):
                    off = rng.randrange(0, apparent // (256 << 10)) * (256 << 10)
                    f.seek(off)
                    f.write(rng.randbytes(256 << 10))

    # symlinks: relative to files and directories, absolute, dangling
    for i in range(int(500 * scale)):
        target = os.path.relpath(rng.choice(small), links)
        os.symlink(target, os.path.join(links, "ref-%05d" % i))
    os.symlink("../app/logs", os.path.join(links, "logs-dir"))
    os.symlink("/etc/hostname", os.path.join(links, "absolute"))
    os.symlink("does/not/exist", os.path.join(links, "dangling"))

    # hard links: a few small files and one media file with several names
    for i in range(20):
        os.link(small[i * 7], os.path.join(links, "hard-%02d" % i))
    os.link(os.path.join(media, "clip-0-00.bin"), os.path.join(media, "clip-0-00.alias"))

    # some files owned by another user, one with extended attributes
    for p in small[:200]:
        os.chown(p, 1000, 1000)
    try:
        os.setxattr(small[0], "user.ferry.bench", b"tagged")
    except OSError:
        pass


def mutate(root, seed):
    """Change about 1% of the tree, the same way for a given seed."""
    rng = random.Random(seed)
    docs = os.path.join(root, "app", "docs")
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(docs) for f in fs)
    # edit 1% of the small files, delete a few, add a few
    for p in rng.sample(files, max(1, len(files) // 100)):
        with open(p, "ab") as f:
            f.write(b"\n" + sentence(rng, rng.randrange(5, 50)).encode() + b"\n")
    for p in rng.sample(files, 20):
        os.unlink(p)
    new_dir = os.path.join(docs, "new-%d" % seed)
    os.makedirs(new_dir, exist_ok=True)
    for i in range(50):
        write(os.path.join(new_dir, "order-new-%03d.json" % i), json_doc(rng, 10**7 + i))

    # append ~4 MiB to the five newest logs
    logs = os.path.join(root, "app", "logs")
    for name in sorted(os.listdir(logs))[-5:]:
        data, _ = log_lines(rng, 1_800_000_000_000, 800 << 10)
        with open(os.path.join(logs, name), "ab") as f:
            f.write(data)

    # rewrite a 4 MiB range in the middle of the largest media file
    media = os.path.join(root, "media")
    big = max((os.path.join(media, f) for f in os.listdir(media)), key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        f.write(rng.randbytes(4 * MIB))
    # one new media file
    write(os.path.join(media, "new-%d.bin" % seed), rng.randbytes(4 * MIB))

    # fill one more extent of the disk image
    img = os.path.join(root, "disk", "vm-0.img")
    with open(img, "r+b") as f:
        f.seek(8 * MIB)
        f.write(rng.randbytes(256 << 10))


def manifest(root):
    """Print one line per entry: what a faithful restore must reproduce."""
    inode_names = {}
    lines = []
    for dp, dns, fns in os.walk(root):
        dns.sort()
        for name in sorted(dns) + sorted(fns):
            p = os.path.join(dp, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            meta = "%o %d:%d" % (st.st_mode, st.st_uid, st.st_gid)
            if os.path.islink(p):
                lines.append("%s l %s -> %s" % (rel, meta, os.readlink(p)))
            elif os.path.isdir(p):
                lines.append("%s d %s" % (rel, meta))
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while True:
                        b = f.read(4 * MIB)
                        if not b:
                            break
                        h.update(b)
                key = (st.st_dev, st.st_ino)
                link = ""
                if st.st_nlink > 1:
                    first = inode_names.setdefault(key, rel)
                    link = " hardlink-group=%s" % first
                lines.append("%s f %s %d %d %s%s" % (rel, meta, st.st_size,
                                                     int(st.st_mtime), h.hexdigest(), link))
    lines.sort()
    sys.stdout.write("\n".join(lines) + "\n")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "manifest":
        manifest(sys.argv[2])
        return
    if len(sys.argv) != 4 or sys.argv[1] not in ("generate", "mutate"):
        sys.exit("usage: files.py generate DIR SCALE | files.py mutate DIR SEED | files.py manifest DIR")
    if sys.argv[1] == "generate":
        generate(sys.argv[2], float(sys.argv[3]))
    else:
        mutate(sys.argv[2], int(sys.argv[3]))


if __name__ == "__main__":
    main()
