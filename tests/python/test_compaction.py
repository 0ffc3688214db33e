"""Small lake files of closed partitions are merged while the platform runs.

Every checkpoint commits the open lake files, so a small fleet leaves thousands of small files
a day per table; DESIGN.md promises that small files of closed partitions are compacted. A
device uploads a backlog from two days ago (a closed partition) one packet per checkpoint; the
partition must end as one file holding every sample exactly once, readable by DuckDB.
"""

from __future__ import annotations

import datetime as dt
import random
import time

import duckdb
import pyarrow.parquet as pq

from testkit import (
    PERIOD_US, Platform, Publisher, check_lake_exactly_once, encode_packet, metric, synthetic_samples, wait_until,
)

PACKETS = 6
ENV = {"SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "0.3"}


def committed_rows(files) -> int | None:
    """Rows in `files`, or None if one was merged away while we read (retry)."""
    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except FileNotFoundError:
        return None


def test_small_files_of_a_closed_partition_are_merged(tmp_path):
    t0 = int((time.time() - 2 * 86400) * 1e6)
    day = dt.datetime.fromtimestamp(t0 / 1e6, dt.timezone.utc).date()
    if dt.datetime.fromtimestamp((t0 + PACKETS * 64 * PERIOD_US) / 1e6, dt.timezone.utc).date() != day:
        t0 += 60_000_000  # keep the backlog on one date when run just before midnight
        day = dt.datetime.fromtimestamp(t0 / 1e6, dt.timezone.utc).date()
    partition = tmp_path / "lake" / "samples" / f"date={day.isoformat()}"

    def files():
        return sorted(partition.glob("part-*.parquet"))

    platform = Platform(tmp_path, env=ENV)
    try:
        pub = Publisher(platform.mqtt_host, platform.mqtt_port)
        for k in range(PACKETS):
            base = 64 * k
            payload = encode_packet(base, t0 + base * PERIOD_US, synthetic_samples(64, k))
            pub.publish("backlog-a", ("backlog-a", base), payload)
            pub.wait_all_acked(timeout=30)
            # One file per packet at least: the next is sent once this one's rows are committed.
            wait_until(lambda: committed_rows(files()) == base + 64, timeout=30, message=f"packet {k} committed")
        pub.close()

        wait_until(
            lambda: len(files()) == 1 and committed_rows(files()) == PACKETS * 64,
            timeout=60,
            message="the partition merged into one file",
        )
        assert metric(platform.get("/metrics").text, "sensorflow_lake_compactions_total") >= 1
        indices = duckdb.sql(
            f"SELECT sample_index FROM read_parquet('{partition}/*.parquet') ORDER BY sample_index"
        ).fetchall()
        assert [i for (i,) in indices] == list(range(PACKETS * 64)), "a sample missing or doubled"
    finally:
        assert platform.stop() == 0
    # Nothing half-done is left behind (temp files, journals).
    assert not [p for p in partition.iterdir() if p.name.startswith(".")]


def test_kill_9_while_compacting_loses_and_doubles_nothing(tmp_path):
    """Recovery deletes the lake files of epochs after its checkpoint. A merged file must never
    be one of them (its inputs are gone), nor may it hold rows the log replay writes again."""
    sensors, packets = 8, 30
    t0 = int((time.time() - 2 * 86400) * 1e6)
    data = tmp_path / "data"
    platform = Platform(data, env=ENV)
    mqtt_listen, http_listen = f"127.0.0.1:{platform.mqtt_port}", platform.http.removeprefix("http://")
    rng = random.Random(7)
    kill_rounds = set(rng.sample(range(4, packets - 2), 3))
    compactions = 0

    def compacted(p: Platform) -> int:
        return sum("lake partition compacted" in line for line in p.log_lines)

    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    try:
        for k in range(packets):
            for s in range(sensors):
                sid = f"backlog-{s}"
                base = 64 * k
                pub.publish(sid, (sid, base), encode_packet(base, t0 + base * PERIOD_US, synthetic_samples(64, 100 * s + k)))
            time.sleep(0.15)
            if k in kill_rounds:
                time.sleep(rng.uniform(0.0, 0.4))
                platform.kill()
                compactions += compacted(platform)
                platform = Platform(data, env=ENV, mqtt_listen=mqtt_listen, http_listen=http_listen)
        pub.wait_all_acked(timeout=120)
        acked = set(pub.acked)
        pub.close()
        # Let the last checkpoints merge what the run left.
        wait_until(lambda: compactions + compacted(platform) >= 3, timeout=60, message="compactions")
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    compactions += compacted(platform)
    assert compactions >= 3, "the run did not exercise compaction"
    check_lake_exactly_once(data / "lake", acked)
