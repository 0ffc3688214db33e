"""End to end through the real binary: paho-mqtt publishes device packets, the lake is read
back with pyarrow and DuckDB, the API and WebSockets are checked over real sockets."""

from __future__ import annotations

import time

import duckdb
import paho.mqtt.client as mqtt
import pyarrow.dataset as ds

from testkit import PERIOD_US, Platform, WsCollector, encode_packet, json_packet, synthetic_samples, wait_until

FAST_ENV = {
    # Publish lake files after 1 s and aggregates every second, so the test need not wait long.
    "SENSORFLOW_LAKE_MAX_FILE_AGE_SECS": "1",
    "SENSORFLOW_PIPELINE_AGGREGATE_INTERVAL_SECS": "1",
}


def mqtt_client(platform: Platform, protocol=mqtt.MQTTv311) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-{time.monotonic_ns()}", protocol=protocol)
    client.connect(platform.mqtt_host, platform.mqtt_port, keepalive=30)
    client.loop_start()
    return client


def publish_all(client: mqtt.Client, messages: list[tuple[str, bytes]]):
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout=30)
        assert info.is_published(), "a QoS 1 publish was not acknowledged"


def lake_counts(lake) -> dict[str, int]:
    # Hidden files are in-progress writes; only committed files count.
    if not any(f for f in (lake / "samples").glob("date=*/*.parquet")):
        return {}
    table = ds.dataset(str(lake / "samples"), format="parquet", partitioning="hive").to_table(columns=["sensor_id"])
    counts: dict[str, int] = {}
    for sid in table.column("sensor_id").to_pylist():
        counts[sid] = counts.get(sid, 0) + 1
    return counts


def test_binary_packets_reach_lake_api_and_websockets_exactly_once(tmp_path):
    platform = Platform(tmp_path / "data", env=FAST_ENV)
    try:
        raw = WsCollector(platform.ws + "/ws/raw/imu-a")
        agg = WsCollector(platform.ws + "/ws/aggregate/imu-a")
        t0 = int(time.time() * 1e6) - 10_000_000

        def pkt(base, k, seed):
            return encode_packet(base, t0 + k * 64 * PERIOD_US, synthetic_samples(64, seed))

        p = [pkt(1000 + 64 * k, k, k) for k in range(6)]
        corrupt = bytearray(p[2])
        corrupt[20] ^= 0xFF  # payload byte: the CRC no longer verifies
        garbage = b"\xde\xad\xbe\xef\x7c\x00junk\x7c\x1e"
        a = "stream/imu-a"
        messages = [
            (a, p[0]),
            (a, p[1][:30]),  # one packet split across two messages
            (a, p[1][30:]),
            (a, bytes(corrupt)),
            (a, p[3]),
            (a, p[3]),  # exact duplicate (at-least-once redelivery)
            (a, garbage + p[4]),  # garbage before a packet
            (a, p[5]),
            # imu-b: four packets in one message
            ("stream/imu-b", b"".join(encode_packet(64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, 10 + k)) for k in range(4))),
        ] + [("stream/imu-c", encode_packet(500 + 64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, 20 + k, moving=False))) for k in range(3)]
        # imu-d: packet 1 arrives after packet 2 (a backlog upload after live data), then again.
        d = [encode_packet(64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, 30 + k)) for k in range(3)]
        messages += [("stream/imu-d", d[0]), ("stream/imu-d", d[2]), ("stream/imu-d", d[1]), ("stream/imu-d", d[1])]
        expected = {"imu-a": 5 * 64, "imu-b": 4 * 64, "imu-c": 3 * 64, "imu-d": 3 * 64}

        client = mqtt_client(platform)
        publish_all(client, messages)
        client.disconnect()

        lake = tmp_path / "data" / "lake"
        wait_until(lambda: lake_counts(lake) == expected, timeout=60, message=f"lake counts {expected}")

        sensor = platform.get("/sensors/imu-a").json()
        assert sensor["bad"].get("bad_crc") == 1, sensor
        assert sensor["bad"].get("garbage", 0) >= 1, sensor
        assert sensor["duplicates"] == 64, sensor
        assert sensor["gaps"] == 1 and sensor["missing_samples"] == 64, sensor
        assert platform.get("/sensors/imu-b").json()["bad_total"] == 0
        late = platform.get("/sensors/imu-d").json()
        assert late["reordered_samples"] == 64 and late["duplicates"] == 64, late
        assert late["gaps"] == 1 and late["missing_samples"] == 64, late

        metrics = platform.get("/metrics").text
        assert 'sensorflow_sensor_bad_input_total{sensor_id="imu-a",reason="bad_crc"} 1' in metrics
        assert 'sensorflow_sensor_reordered_samples_total{sensor_id="imu-d"} 64' in metrics

        sessions = platform.get("/sessions").json()
        by_sensor = {s["sensor_id"]: s for s in sessions}
        assert set(by_sensor) == {"imu-a", "imu-b", "imu-c", "imu-d"}, sessions
        assert by_sensor["imu-a"]["session_id"] == f"imu-a_{t0}"
        assert platform.get(f"/sessions/imu-a_{t0}").status_code == 200
        assert platform.get("/sessions/nope").status_code == 404

        wait_until(lambda: any(m.get("session_id") == f"imu-a_{t0}" for m in agg.messages), timeout=20, message="an aggregate on /ws/aggregate/imu-a")
        rows = raw.rows()
        assert rows, "no processed sample on /ws/raw/imu-a"
        assert all(r["sensor_id"] == "imu-a" and isinstance(r["velocity_pred"], float) for r in rows)
        assert {r["sample_index"] for r in rows} <= set(range(1000, 1000 + 6 * 64))
        raw.close()
        agg.close()
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])

    # After a graceful stop the lake is complete and readable by DuckDB too.
    con = duckdb.connect()
    glob = str(tmp_path / "data" / "lake" / "samples" / "**" / "*.parquet")
    rows = con.execute(f"select sensor_id, count(*), count(distinct sample_index) from read_parquet('{glob}', hive_partitioning=true) group by 1 order by 1").fetchall()
    assert rows == [(k, v, v) for k, v in sorted(expected.items())]
    nulls = con.execute(f"select count(*) from read_parquet('{glob}') where velocity_pred is null or isnan(velocity_pred)").fetchone()[0]
    assert nulls == 0
    # A clean stop ends no session (the final checkpoint keeps the four for the next start), so
    # the `sessions` table, which records ended sessions, holds none of them.
    session_files = list((tmp_path / "data" / "lake" / "sessions").glob("date=*/*.parquet"))
    if session_files:
        ended = con.execute(f"select count(*) from read_parquet('{tmp_path}/data/lake/sessions/**/*.parquet') where end_us is not null").fetchone()[0]
        assert ended == 0


def test_json_packets_reach_the_lake_exactly_once(tmp_path):
    platform = Platform(tmp_path / "data", env=FAST_ENV)
    try:
        t0 = int(time.time() * 1e6) - 10_000_000
        packets = [json_packet(64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, k)) for k in range(4)]
        topic = "sensors/json-1/data"
        messages = [(topic, packets[0]), (topic, packets[1]), (topic, b'{"timestamp_us": oops'), (topic, packets[1]), (topic, packets[2]), (topic, packets[3])]
        messages += [("sensors/json-2/data", json_packet(0, t0, synthetic_samples(32, 9)))]
        client = mqtt_client(platform, protocol=mqtt.MQTTv5)
        publish_all(client, messages)
        client.disconnect()
        lake = tmp_path / "data" / "lake"
        expected = {"json-1": 4 * 64, "json-2": 32}
        wait_until(lambda: lake_counts(lake) == expected, timeout=60, message=f"lake counts {expected}")
        s = platform.get("/sensors/json-1").json()
        assert s["bad"].get("invalid_json") == 1, s
        assert s["duplicates"] == 64, s
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    table = ds.dataset(str(tmp_path / "data" / "lake" / "samples"), format="parquet", partitioning="hive").to_table()
    pairs = list(zip(table.column("sensor_id").to_pylist(), table.column("sample_index").to_pylist()))
    assert len(pairs) == len(set(pairs)) == 4 * 64 + 32
    # Units: acc stays in g, gyro is converted from deg/s to rad/s.
    gyro_x = table.column("gyro_x").to_pylist()
    assert max(abs(g) for g in gyro_x) < 10, "gyro looks like deg/s, expected rad/s"


def test_unknown_topic_is_counted_and_does_not_stop_ingest(tmp_path):
    platform = Platform(tmp_path / "data", env=FAST_ENV)
    try:
        t0 = int(time.time() * 1e6)
        client = mqtt_client(platform)
        publish_all(client, [("weird/topic", b"x"), ("stream/ok", encode_packet(0, t0, synthetic_samples(64, 1)))])
        client.disconnect()
        wait_until(lambda: lake_counts(tmp_path / "data" / "lake") == {"ok": 64}, timeout=60, message="ok sensor in lake")
        metrics = platform.get("/metrics").text
        assert 'sensorflow_ingest_rejected_total{reason="unknown_topic"} 1' in metrics, metrics
    finally:
        assert platform.stop() == 0
