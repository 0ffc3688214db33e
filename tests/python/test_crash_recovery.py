"""Crash recovery: kill -9 the platform while 20 sensors publish with QoS 1, restart it on the
same ports, and check that every acknowledged sample is in the lake exactly once and that each
session's final distance equals a clean run's on the same input."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pyarrow.parquet as pq

from testkit import PERIOD_US, Platform, encode_packet, synthetic_samples, wait_until

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


class Publisher:
    """One persistent-session paho client per sensor; records every PUBACKed packet."""

    def __init__(self, host: str, port: int):
        self.acked: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self.clients: dict[str, mqtt.Client] = {}
        self.mids: dict[tuple[str, int], tuple[str, int]] = {}
        self.infos: list = []
        self.host, self.port = host, port

    def client(self, sid: str) -> mqtt.Client:
        if sid not in self.clients:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{sid}", clean_session=False, protocol=mqtt.MQTTv311)
            c.max_inflight_messages_set(50)
            c.reconnect_delay_set(min_delay=0.05, max_delay=0.5)

            def on_publish(client, userdata, mid, reason_code, properties, sid=sid):
                with self.lock:
                    key = self.mids.get((sid, mid))
                    if key is not None:
                        self.acked.add(key)

            c.on_publish = on_publish
            c.connect(self.host, self.port, keepalive=10)
            c.loop_start()
            self.clients[sid] = c
        return self.clients[sid]

    def publish(self, sid: str, base: int, payload: bytes):
        c = self.client(sid)
        with self.lock:
            info = c.publish(f"stream/{sid}", payload, qos=1)
            self.mids[(sid, info.mid)] = (sid, base)
        self.infos.append(info)

    def close(self):
        for c in self.clients.values():
            c.disconnect()
            c.loop_stop()


def publish_all(platform_addr: tuple[str, int], packets, interval: float, on_round=None) -> Publisher:
    pub = Publisher(*platform_addr)
    for k in range(PACKETS):
        for sid, plist in packets.items():
            pub.publish(sid, *plist[k])
        if on_round:
            on_round(k)
        time.sleep(interval)
    total = SENSORS * PACKETS
    wait_until(lambda: len(pub.acked) == total, timeout=180, interval=0.2, message=f"all {total} packets acknowledged")
    return pub


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


def final_distances(lake: Path) -> dict[str, float]:
    table = pq.read_table(str(lake / "session_aggregates"))
    best: dict[str, tuple] = {}
    for row in table.to_pylist():
        key = (row["sample_count"], row["emitted_at_us"])
        if row["session_id"] not in best or key > best[row["session_id"]][0]:
            best[row["session_id"]] = (key, row["distance_m"])
    return {sid: v[1] for sid, v in best.items()}


def check_lake_exactly_once(lake: Path, acked: set[tuple[str, int]]):
    files = sorted(lake.glob("*/date=*/*.parquet"))
    assert files, "no lake files"
    for f in files:
        pq.read_table(f)  # every committed file is readable
    samples = pq.read_table(str(lake / "samples"), columns=["sensor_id", "sample_index"]).to_pylist()
    pairs = [(r["sensor_id"], r["sample_index"]) for r in samples]
    assert len(pairs) == len(set(pairs)), f"{len(pairs) - len(set(pairs))} duplicate samples in the lake"
    present = set(pairs)
    missing = [(sid, base + i) for sid, base in acked for i in range(64) if (sid, base + i) not in present]
    assert not missing, f"{len(missing)} acknowledged samples missing, e.g. {missing[:5]}"


def test_kill_9_four_times_loses_and_doubles_nothing(tmp_path):
    t0 = int(time.time() * 1e6) - 60_000_000
    packets = make_packets(t0)

    # Clean reference run.
    clean = Platform(tmp_path / "clean", env=ENV)
    try:
        pub = publish_all((clean.mqtt_host, clean.mqtt_port), packets, interval=0.02)
        pub.close()
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
