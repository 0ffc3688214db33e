"""Crash recovery: kill -9 the platform while 20 sensors publish with QoS 1, restart it on the
same ports, and check that every acknowledged sample is in the lake exactly once and that each
session's final distance equals a clean run's on the same input.

A clean stop ends no session (the sessions continue after a restart), so neither run's stop
emits a final aggregate: each run waits, before stopping, for the periodic aggregate that
covers every sample of every session, and the two runs compare those."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pyarrow.parquet as pq

from testkit import PERIOD_US, Platform, Publisher, check_lake_exactly_once, encode_packet, metric, synthetic_samples, wait_until

SENSORS = 20
PACKETS = 40
# Lake files roll every second but checkpoints come every 3 s, so kills land both before and
# after files of an unfinished checkpoint epoch were committed: recovery must delete those and
# replay the log, or the lake holds duplicates.
ENV = {
    "SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "3",
    "SENSORFLOW_LAKE_MAX_FILE_AGE_SECS": "1",
}


def make_packets(t0: int) -> dict[str, list[tuple[int, bytes]]]:
    out = {}
    for s in range(SENSORS):
        sid = f"crash-{s:02d}"
        out[sid] = [(1000 * s + 64 * k, encode_packet(1000 * s + 64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, s * 100 + k, moving=(k // 10) % 2 == 0))) for k in range(PACKETS)]
    return out


def publish_all(platform_addr: tuple[str, int], packets, interval: float, on_round=None) -> Publisher:
    pub = Publisher(*platform_addr)
    for k in range(PACKETS):
        for sid, plist in packets.items():
            base, payload = plist[k]
            pub.publish(sid, (sid, base), payload)
        if on_round:
            on_round(k)
        time.sleep(interval)
    total = SENSORS * PACKETS
    assert len(pub.published) == total
    pub.wait_all_acked(timeout=180)
    return pub


def wait_for_complete_aggregates(platform: Platform):
    """Until every sensor's session has an aggregate covering all its samples: the lake then
    holds it once the platform stops."""

    def complete():
        sessions = platform.get("/sessions?limit=1000").json()
        done = [s for s in sessions if s["aggregate"] and s["aggregate"]["sample_count"] == PACKETS * 64]
        return len(done) == SENSORS

    wait_until(complete, timeout=60, interval=0.25, message=f"aggregates of all {PACKETS * 64} samples of {SENSORS} sessions")


def final_distances(lake: Path) -> dict[str, float]:
    table = pq.read_table(str(lake / "session_aggregates"))
    best: dict[str, tuple] = {}
    for row in table.to_pylist():
        key = (row["sample_count"], row["emitted_at_us"])
        if row["session_id"] not in best or key > best[row["session_id"]][0]:
            best[row["session_id"]] = (key, row["distance_m"])
    return {sid: v[1] for sid, v in best.items()}


def test_kill_9_four_times_loses_and_doubles_nothing(tmp_path):
    t0 = int(time.time() * 1e6) - 60_000_000
    packets = make_packets(t0)

    # Clean reference run.
    clean = Platform(tmp_path / "clean", env=ENV)
    try:
        pub = publish_all((clean.mqtt_host, clean.mqtt_port), packets, interval=0.02)
        pub.close()
        wait_for_complete_aggregates(clean)
    finally:
        assert clean.stop() == 0
    reference = final_distances(tmp_path / "clean" / "lake")
    assert len(reference) == SENSORS

    # Crash run: same input, kill -9 at random moments while publishing.
    data = tmp_path / "crash"
    platform = Platform(data, env=ENV)
    mqtt_listen = f"127.0.0.1:{platform.mqtt_port}"
    http_listen = platform.http.removeprefix("http://")
    rng = random.Random(1234)
    kill_rounds = sorted(rng.sample(range(3, PACKETS - 2), 4))
    kills = []
    recoveries = []

    def on_round(k):
        nonlocal platform
        if k in kill_rounds:
            time.sleep(rng.uniform(0.0, 1.0))
            platform.kill()
            kills.append(k)
            platform = Platform(data, env=ENV, mqtt_listen=mqtt_listen, http_listen=http_listen)
            recoveries.append(metric(platform.get("/metrics").text, "sensorflow_recovery_log_records"))

    try:
        pub = publish_all((platform.mqtt_host, platform.mqtt_port), packets, interval=0.25, on_round=on_round)
        acked = set(pub.acked)
        pub.close()
        wait_for_complete_aggregates(platform)
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    assert len(kills) == 4
    assert list((data / "checkpoints").glob("*.ckpt")), "no checkpoint was written"
    assert sum(recoveries) > 0, "no restart replayed any log record: the kills did not exercise recovery"
    check_lake_exactly_once(data / "lake", acked)

    crashed = final_distances(data / "lake")
    assert set(crashed) == set(reference)
    for sid, d in reference.items():
        assert abs(crashed[sid] - d) <= 1e-6 * max(abs(d), 1e-9), f"{sid}: distance {crashed[sid]} vs clean {d}"
