"""`sensorflow loadtest` in its default mode: it starts `sensorflow run` as a child, drives
virtual sensors at it, and reports what it measured (issue 4's contract for `--json`)."""

from __future__ import annotations

import csv
import json
import os
import subprocess

from testkit import binary_path

SENSORS, RATE_HZ, SECONDS = 6, 200, 3
REQUIRED = [
    "sensors", "rate_hz", "duration_s", "samples_sent", "samples_in_lake", "lost",
    "latency_ms_p50", "latency_ms_p99", "rss_mb_max", "cpu_pct_mean",
]


def test_loadtest_reports_every_sent_sample_in_the_lake_and_logs_each_latency(tmp_path):
    latency_log = tmp_path / "latency.csv"
    run = subprocess.run(
        [str(binary_path()), "loadtest", "--sensors", str(SENSORS), "--rate", str(RATE_HZ),
         "--duration", str(SECONDS), "--ws-sensors", "3", "--json", "--latency-log", str(latency_log)],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(report.get(k) is not None for k in REQUIRED), report
    assert (report["sensors"], report["rate_hz"]) == (SENSORS, RATE_HZ)

    # 64-sample packets, one per 320 ms per sensor: at least 8 per sensor in 3 s.
    assert report["samples_sent"] >= SENSORS * 8 * 64, report
    assert report["samples_sent"] == report["samples_acked"] == report["samples_in_lake"], report
    assert (report["lost"], report["duplicates_in_lake"], report["publish_errors"]) == (0, 0, 0), report
    assert report["rss_mb_max"] > 0 and report["cpu_pct_mean"] > 0, report
    # Figures name the hardware they were measured on (Linux: from /proc/cpuinfo).
    assert str(os.cpu_count()) + " CPUs" in report["host_cpu"], report

    with latency_log.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["latency_samples"] > 0
    received = [int(r["received_unix_us"]) for r in rows]
    latencies = sorted(float(r["latency_ms"]) for r in rows)
    assert received == sorted(received), "rows are in receipt order"
    assert abs(latencies[-1] - report["latency_ms_max"]) < 0.001
    assert latencies[0] <= report["latency_ms_p50"] <= report["latency_ms_p99"] <= latencies[-1]
