"""Faults at process level: the lake directory becomes unwritable while sensors publish; a
sink slower than the publishers for 30 s; a torn log tail together with a corrupt newest
checkpoint. QoS 1 publishes must be held back rather than acknowledged and lost, memory must
stay bounded, damage must be detected and reported, and afterwards every acknowledged sample
must be in the lake exactly once.

The overload test slows the sink with the `sink-batch` fail point, so it needs a binary built
with `--features sensorflow/failpoints` (scripts/test.sh builds it so)."""

from __future__ import annotations

import itertools
import struct
import threading
import time

from testkit import PERIOD_US, Platform, Publisher, WsCollector, check_lake_exactly_once, encode_packet, metric, rss_mb, synthetic_samples, wait_until


class PacketSource:
    """Consecutive 64-sample packets per sensor, from a fixed set of sample values."""

    def __init__(self, sensors: list[str], t0_us: int):
        self.samples = {sid: synthetic_samples(64, i) for i, sid in enumerate(sensors)}
        self.next = {sid: 0 for sid in sensors}
        self.t0_us = t0_us

    def take(self, sid: str) -> tuple[tuple[str, int], bytes]:
        base = self.next[sid]
        self.next[sid] = base + 64
        return (sid, base), encode_packet(base, self.t0_us + base * PERIOD_US, self.samples[sid])


class Flood(threading.Thread):
    """Publishes round-robin over the sensors as fast as paho's in-flight windows allow."""

    def __init__(self, pub: Publisher, source: PacketSource, sensors: list[str], max_unacked: int):
        super().__init__(daemon=True)
        self.pub, self.source, self.sensors, self.max_unacked = pub, source, sensors, max_unacked
        self.stop = threading.Event()

    def run(self):
        for sid in itertools.cycle(self.sensors):
            if self.stop.is_set():
                return
            # paho queues without bound beyond its in-flight window; cap what this test keeps
            # outstanding so the client, not the platform, is what holds the backlog.
            while self.pub.unacked() >= self.max_unacked and not self.stop.is_set():
                time.sleep(0.01)
            key, payload = self.source.take(sid)
            self.pub.publish(sid, key, payload)


def ready(platform: Platform) -> tuple[int, dict]:
    r = platform.get("/ready")
    return r.status_code, r.json()


def test_unwritable_lake_dir_withholds_acks_and_recovers_without_loss(tmp_path):
    bound = 1 << 20
    env = {
        "SENSORFLOW_LAKE_MAX_FILE_AGE_SECS": "1",
        "SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "2",
        "SENSORFLOW_LOG_MAX_UNCONSUMED_BYTES": str(bound),
        # Small segments and no retention beyond the checkpoints: the log is trimmed past the
        # offset the dataflow started from before the fault, as in any long run.
        "SENSORFLOW_LOG_SEGMENT_BYTES": str(64 * 1024),
        "SENSORFLOW_LOG_RETENTION_BYTES": "0",
        "SENSORFLOW_LOG_RETENTION_SECS": "0",
    }
    sensors = [f"fault-{i}" for i in range(8)]
    source = PacketSource(sensors, int(time.time() * 1e6) - 120_000_000)
    platform = Platform(tmp_path / "data", env=env)
    lake = tmp_path / "data" / "lake"
    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    live = WsCollector(platform.ws + f"/ws/raw/{sensors[0]}")
    try:
        # Healthy: data reaches the lake, and checkpoints let retention delete the log's first
        # segments, the one holding offset 0 (where this run of the dataflow started) included.
        log_dir = tmp_path / "data" / "log"

        def first_segment_base() -> int:
            return min(int(p.stem) for p in log_dir.glob("*.log"))

        def publish_some() -> int:
            for _ in range(5):
                for sid in sensors:
                    pub.publish(sid, *source.take(sid))
            pub.wait_all_acked(timeout=60)
            return first_segment_base()

        wait_until(lambda: publish_some() > 0, timeout=60, message="the log trimmed past offset 0")
        wait_until(lambda: list(lake.glob("samples/date=*/*.parquet")), timeout=30, message="a samples file in the lake")
        assert ready(platform)[0] == 200

        # The lake root turns into a regular file: every write under it fails (ENOTDIR), even
        # for root, for whom permissions would not.
        moved = tmp_path / "data" / "lake.moved"
        lake.rename(moved)
        lake.write_text("not a directory")
        flood = Flood(pub, source, sensors, max_unacked=4000)
        flood.start()

        def failing():
            code, body = ready(platform)
            bad = {k: v["detail"] for k, v in body["components"].items() if not v["ok"]}
            return code == 503 and "dataflow" in bad and bad
        bad = wait_until(failing, timeout=60, message="/ready reporting the failed dataflow")
        assert "lake" in bad and "Not a directory" in bad["lake"], bad

        # Nothing is consumed while the dataflow is down, so the log fills to its bound and
        # appends, hence PUBACKs, are held back.
        wait_until(lambda: metric(platform.get("/metrics").text, "sensorflow_log_unconsumed_bytes") >= bound * 0.9, timeout=60, message="the log backlog reaching its bound")
        wait_until(lambda: pub.unacked() >= 100, timeout=60, message="publishes waiting for their PUBACK")
        assert platform.proc.poll() is None, "the platform exited"
        flood.stop.set()
        flood.join()

        # Space returns: the restart replays the log from the last checkpoint, and the held
        # publishes are acknowledged.
        held = pub.unacked()
        lake.unlink()
        moved.rename(lake)
        pub.wait_all_acked(timeout=120)
        assert held >= 100, held
        wait_until(lambda: ready(platform)[0] == 200, timeout=60, message="/ready back to 200")
        restarts = metric(platform.get("/metrics").text, "sensorflow_dataflow_restarts_total")
        assert restarts >= 1
        acked = set(pub.acked)
        # The live feed carries on after the restart: it reaches the sensor's last acked packet.
        last = max(base for sid, base in acked if sid == sensors[0]) + 63
        wait_until(lambda: live.error is not None or any(r["sample_index"] == last for r in live.rows()), timeout=60, message="the live feed reaching the last acknowledged sample")
        assert live.error is None, f"the live feed closed: {live.error!r}"
    finally:
        live.close()
        pub.close()
        code = platform.stop()
    assert code == 0, "\n".join(platform.log_lines[-40:])
    assert any("dataflow failed" in line for line in platform.log_lines), "the failure was not logged"
    check_lake_exactly_once(lake, acked)
    # Rows the failed run had published were replayed after the restart, to the lake only.
    seen = [(r["session_id"], r["sample_index"]) for r in live.rows()]
    repeated = len(seen) - len(set(seen))
    assert repeated == 0, f"{repeated} of {len(seen)} live rows were delivered twice"


def test_sink_slower_than_publishers_for_30s_keeps_memory_bounded_and_loses_nothing(tmp_path):
    bound = 4 << 20
    rss_limit_mb = 400
    env = {
        "FAILPOINTS": "sink-batch=sleep(100)",
        "SENSORFLOW_RUNTIME_BATCH_RECORDS": "32",
        "SENSORFLOW_LOG_MAX_UNCONSUMED_BYTES": str(bound),
        "SENSORFLOW_LAKE_MAX_FILE_AGE_SECS": "2",
    }
    sensors = [f"load-{i:02d}" for i in range(20)]
    source = PacketSource(sensors, int(time.time() * 1e6) - 600_000_000)
    platform = Platform(tmp_path / "data", env=env)
    assert any("fail point configured" in line for line in platform.log_lines), (
        "FAILPOINTS ignored: build the binary with `--features sensorflow/failpoints`"
    )
    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    flood = Flood(pub, source, sensors, max_unacked=20 * 50)
    rss, backlog = [], []
    try:
        flood.start()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            rss.append(rss_mb(platform.proc.pid))
            backlog.append(metric(platform.get("/metrics").text, "sensorflow_log_unconsumed_bytes"))
            time.sleep(0.5)  # sampling period of the measurements, not synchronisation
        flood.stop.set()
        flood.join()
        published = len(pub.published)
        pub.wait_all_acked(timeout=180)
        acked = set(pub.acked)
    finally:
        pub.close()
        code = platform.stop()
    assert code == 0, "\n".join(platform.log_lines[-40:])
    # The sink really was the bottleneck: the backlog hit the log's bound ...
    assert max(backlog) >= bound * 0.75, f"backlog peaked at {max(backlog):.0f} B of {bound}: was the sink slowed down?"
    # ... and stayed at it rather than growing past it (one in-flight batch of slack).
    assert max(backlog) <= bound + (1 << 20), f"backlog {max(backlog):.0f} B exceeded the bound {bound}"
    assert max(rss) < rss_limit_mb, f"RSS peaked at {max(rss):.0f} MB (limit {rss_limit_mb})"
    # Memory did not creep up while the overload lasted.
    later = rss[len(rss) // 3:]
    assert max(later) - min(later) < 64, f"RSS drifted from {min(later):.0f} to {max(later):.0f} MB"
    print(f"published {published} packets in 30 s; backlog max {max(backlog) / 1e6:.1f} MB; RSS max {max(rss):.0f} MB")
    check_lake_exactly_once(tmp_path / "data" / "lake", acked)


def test_torn_log_tail_and_corrupt_newest_checkpoint_are_reported_and_lose_nothing(tmp_path):
    data = tmp_path / "data"
    env = {"SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "1", "SENSORFLOW_LAKE_MAX_FILE_AGE_SECS": "1"}
    sensors = [f"torn-{i}" for i in range(4)]
    source = PacketSource(sensors, int(time.time() * 1e6) - 120_000_000)
    acked = set()

    def checkpoints() -> float:
        return metric(platform.get("/metrics").text, "sensorflow_checkpoints_total")

    platform = Platform(data, env=env)
    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    for phase in range(2):
        for _ in range(10):
            for sid in sensors:
                pub.publish(sid, *source.take(sid))
        pub.wait_all_acked(timeout=60)
        # A checkpoint after each phase: the newest (to be corrupted) covers the second, the
        # previous one (the fallback) usually only the first, so the second is replayed.
        seen = checkpoints()
        wait_until(lambda: checkpoints() >= seen + 1, timeout=30, message=f"a checkpoint after phase {phase}")
    acked |= set(pub.acked)
    platform.kill()
    pub.close()

    # The newest checkpoint loses a byte to bit rot; the log ends in half a record, as after a
    # crash in the middle of a write.
    newest = sorted((data / "checkpoints").glob("*.ckpt"))[-1]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    newest.write_bytes(bytes(raw))
    segment = sorted((data / "log").glob("*.log"))[-1]
    torn = struct.pack("<II", 100, 0) + b"partial"
    with open(segment, "ab") as f:
        f.write(torn)

    platform = Platform(data, env=env)
    try:
        text = platform.get("/metrics").text
        assert metric(text, "sensorflow_checkpoints_corrupt_total") == 1
        assert metric(text, "sensorflow_log_truncated_bytes") == len(torn)
        pub = Publisher(platform.mqtt_host, platform.mqtt_port)
        for _ in range(20):
            for sid in sensors:
                pub.publish(sid, *source.take(sid))
        pub.wait_all_acked(timeout=60)
        acked |= set(pub.acked)
        pub.close()
    finally:
        code = platform.stop()
    assert code == 0, "\n".join(platform.log_lines[-40:])
    assert any("checkpoint failed verification" in line for line in platform.log_lines)
    check_lake_exactly_once(data / "lake", acked)
    assert len(acked) == 2 * 20 * len(sensors)
