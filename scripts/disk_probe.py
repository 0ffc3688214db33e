#!/usr/bin/env python3
"""How long a small append + fdatasync waits while another process writes in bulk.

The log's group commit is a small append followed by fdatasync; the lake writes Parquet in
bulk. This reproduces the pair on the disk under DIR: a writer process appends at RATE MB/s to
200 MB files and syncs every SYNC_MB (200 = only when a file is complete, like a lake commit;
4 = like `lake.sync_every_bytes`), while the probe appends 20 kB and fdatasyncs every 4 ms.

    python3 scripts/disk_probe.py --dir /path/on/the/disk --sync-mb 200
    python3 scripts/disk_probe.py --dir /path/on/the/disk --sync-mb 4
    python3 scripts/disk_probe.py --dir /path/on/the/disk --sync-mb 0   # no writer
    python3 scripts/disk_probe.py --dir /path/on/the/disk --sync-mb 4 --overwrite
"""

import argparse
import multiprocessing
import os
import time

MB = 1 << 20


def writer(directory, rate_mb, sync_mb, seconds):
    buf = b"y" * MB
    start = time.monotonic()
    written = 0
    fd = None
    files = 0
    while time.monotonic() < start + seconds:
        if fd is None or written % 200 == 0:
            if fd is not None:
                os.fsync(fd)
                os.close(fd)
            fd = os.open(os.path.join(directory, f"writer{files % 3}.dat"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            files += 1
        os.write(fd, buf)
        written += 1
        if written % sync_mb == 0:
            os.fdatasync(fd)
        ahead = start + written / rate_mb - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    os.close(fd)


def probe(directory, seconds, overwrite):
    fd = os.open(os.path.join(directory, "probe.dat"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    buf = b"x" * 20_000
    if overwrite:
        # A recycled segment: written and synced once, then overwritten from the start, so
        # the appends below change no file size and allocate no blocks.
        for _ in range(64):
            os.write(fd, b"z" * MB)
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    waits = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(fd, buf)
        t = time.perf_counter()
        os.fdatasync(fd)
        waits.append(time.perf_counter() - t)
        time.sleep(0.004)
    os.close(fd)
    return sorted(waits)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a directory on the disk to test (files are removed afterwards)")
    ap.add_argument("--sync-mb", type=int, default=200, help="the writer syncs every this many MB; 0: no writer")
    ap.add_argument("--rate", type=float, default=40.0, help="the writer's MB/s (the lake at 5,000 sensors: ~38)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--overwrite", action="store_true",
                    help="the probe overwrites a pre-written 64 MB file instead of appending to a new one")
    args = ap.parse_args()
    bulk = None
    if args.sync_mb > 0:
        bulk = multiprocessing.Process(target=writer, args=(args.dir, args.rate, args.sync_mb, args.seconds + 2))
        bulk.start()
        time.sleep(1)
    try:
        d = probe(args.dir, args.seconds, args.overwrite)
    finally:
        if bulk is not None:
            bulk.join()
        for name in ["probe.dat"] + [f"writer{i}.dat" for i in range(3)]:
            try:
                os.remove(os.path.join(args.dir, name))
            except FileNotFoundError:
                pass
    ms = lambda x: f"{x * 1000:.2f} ms"
    print(
        f"writer sync every {args.sync_mb} MB, probe {'overwrites' if args.overwrite else 'appends'}: n={len(d)} p50={ms(d[len(d) // 2])} "
        f"p99={ms(d[int(len(d) * 0.99)])} >50ms={sum(x > 0.05 for x in d)} max={ms(d[-1])}"
    )


if __name__ == "__main__":
    main()
