#!/usr/bin/env python3
"""Summarise a `sensorflow loadtest --latency-log FILE` CSV: p50, p99 and max, how many seconds
of the run had a measurement over a bound, and the slowest measurement of every second (to see
when the platform fell behind and for how long).

    python3 scripts/latency_seconds.py lat.csv            # bound 100 ms
    python3 scripts/latency_seconds.py lat.csv --bound 50 --per-second
"""

import argparse
import csv
import collections


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="latency log: received_unix_us,latency_ms")
    ap.add_argument("--bound", type=float, default=100.0, help="ms; seconds with a slower measurement are counted")
    ap.add_argument("--per-second", action="store_true", help="also print the slowest measurement of each second")
    args = ap.parse_args()
    rows = [(int(r["received_unix_us"]), float(r["latency_ms"])) for r in csv.DictReader(open(args.csv))]
    if not rows:
        raise SystemExit(f"{args.csv}: no measurements")
    t0 = rows[0][0]
    slowest = collections.defaultdict(float)
    for t, ms in rows:
        second = (t - t0) // 1_000_000
        slowest[second] = max(slowest[second], ms)
    v = sorted(ms for _, ms in rows)

    def pct(p):  # the index `loadtest` uses, so the figures match its report
        return v[int((len(v) - 1) * p + 0.5)]

    over = sum(1 for ms in slowest.values() if ms > args.bound)
    print(
        f"n={len(v)} p50={pct(0.5):.1f} ms p99={pct(0.99):.1f} ms max={v[-1]:.0f} ms "
        f"seconds over {args.bound:g} ms: {over} of {len(slowest)}"
    )
    if args.per_second:
        print(" ".join(f"{s}:{round(slowest[s])}" for s in sorted(slowest)))


if __name__ == "__main__":
    main()
