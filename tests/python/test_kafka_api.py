"""`sensorflow api` against a real Kafka broker (the session's `kafka_broker`): replicas read the
output topics with read_committed, so rows of an aborted transaction never show; every replica
answers the same `/sessions` (ended sessions with their end reason and last aggregate), after a
restart too; `/ready` is 503 until the sessions catch-up is done; WebSocket clients get samples
written after they connected; a malformed record is counted and skipped.

The records are written here the way a processor writes them (transactional producer, JSON
rows keyed by sensor id), so the api role is tested on its own."""

import json
import time
import uuid

import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from testkit import Platform, WsCollector, metric, wait_until

T0_US = 1_760_000_000_000_000
TOPIC_KEYS = ("transformed", "aggregated", "sessions", "windows", "gaps", "late")


class ApiReplica(Platform):
    """`sensorflow api` on a free loopback port (no MQTT listener)."""

    def __init__(self, broker, env: dict):
        super().__init__(None, command="api", extra_args=["--kafka-brokers", broker.bootstrap], env=env, mqtt=False)

    def ready(self) -> bool:
        return self.get("/ready").status_code == 200

    def sessions(self) -> list:
        r = self.get("/sessions", params={"active": "any", "limit": 1000})
        assert r.status_code == 200, r.text
        return r.json()


class Topics:
    """Unique output topic names for one test, created with 3 partitions, and the environment
    that points `sensorflow api` at them."""

    def __init__(self, broker):
        suffix = uuid.uuid4().hex[:8]
        self.names = {k: f"api-{k}-{suffix}" for k in TOPIC_KEYS}
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        futures = admin.create_topics([NewTopic(n, num_partitions=3, replication_factor=1) for n in self.names.values()])
        for f in futures.values():
            f.result(timeout=30)
        self.env = {f"SENSORFLOW_KAFKA_TOPICS_{k.upper()}": n for k, n in self.names.items()}
        self.env["SENSORFLOW_KAFKA_PARTITIONS"] = "3"

    def __getitem__(self, key: str) -> str:
        return self.names[key]


class ProcessorWriter:
    """Writes output-topic records as a processor does: in Kafka transactions."""

    def __init__(self, broker):
        self.p = Producer({
            "bootstrap.servers": broker.bootstrap,
            "transactional.id": f"test-api-{uuid.uuid4().hex[:8]}",
            "enable.idempotence": True,
        })
        self.p.init_transactions(30)

    def transaction(self, records: list, commit: bool = True):
        """`records`: (topic, sensor_id, value) with value a JSON-able object or raw bytes."""
        self.p.begin_transaction()
        for topic, key, value in records:
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            self.p.produce(topic, key=key.encode(), value=raw)
        self.p.flush(30)
        if commit:
            self.p.commit_transaction(30)
        else:
            self.p.abort_transaction(30)


def session_row(sensor: str, start_us: int, last_seen_us: int, count: int, end_us=None) -> dict:
    return {"session_id": f"{sensor}_{start_us}", "sensor_id": sensor, "start_us": start_us,
            "end_us": end_us, "last_seen_us": last_seen_us, "sample_count": count}


def started(sensor: str, start_us: int) -> dict:
    return {"event": "started", **session_row(sensor, start_us, start_us, 0)}


def ended(sensor: str, start_us: int, end_us: int, count: int, reason: str) -> dict:
    return {"event": "ended", **session_row(sensor, start_us, end_us, count, end_us), "end_reason": reason}


def aggregate(sensor: str, start_us: int, emitted_at_us: int, count: int, distance_m: float) -> dict:
    return {"session_id": f"{sensor}_{start_us}", "sensor_id": sensor, "emitted_at_us": emitted_at_us,
            "max_velocity": 2.5, "distance_m": distance_m, "mean_velocity": 1.25, "moving_time_s": 3.0,
            "sample_count": count, "duration_s": 4.0}


def sample_rows(sensor: str, session_start_us: int, first_index: int, n: int) -> list:
    now_us = time.time_ns() // 1000
    return [{
        "sensor_id": sensor, "session_id": f"{sensor}_{session_start_us}", "sample_index": i,
        "timestamp_us": session_start_us + i * 5000, "acc_x": 0.1, "acc_y": 0.2, "acc_z": 1.0,
        "gyro_x": 0.0, "gyro_y": 0.0, "gyro_z": 0.5, "mag_x": 0.3, "mag_y": 0.0, "mag_z": 0.4,
        "temp_raw": 21, "accl_mag": 1.02, "gyro_mag": 0.5, "velocity_pred": 1.5, "velocity_raw": 1.5,
        "movement_prob": 0.9, "model_version": "test-1", "ingest_us": now_us,
    } for i in range(first_index, first_index + n)]


def history(t: Topics) -> list:
    """Committed history: s1 has an ended session (two aggregates) and an active one, s2 one
    active session; a window; two malformed session records among them."""
    s1_a, s1_b, s2_a = T0_US, T0_US + 60_000_000, T0_US + 1_000
    return [
        (t["sessions"], "s1", started("s1", s1_a)),
        (t["aggregated"], "s1", aggregate("s1", s1_a, s1_a + 10_000_000, 2000, 12.5)),
        (t["sessions"], "s1", b"not json at all"),
        (t["aggregated"], "s1", aggregate("s1", s1_a, s1_a + 20_000_000, 4000, 30.0)),
        (t["sessions"], "s1", ended("s1", s1_a, s1_a + 21_000_000, 4200, "idle")),
        (t["sessions"], "s1", {"event": "started", "session_id": "s1_x"}),
        (t["sessions"], "s1", started("s1", s1_b)),
        (t["sessions"], "s2", started("s2", s2_a)),
        (t["aggregated"], "s2", aggregate("s2", s2_a, s2_a + 5_000_000, 1000, 4.0)),
        (t["windows"], "s2", {"sensor_id": "s2", "window_start_us": s2_a, "window_end_us": s2_a + 1_000_000,
                              "count": 200, "accl_mag_mean": 1.0, "accl_mag_std": 0.1, "accl_mag_min": 0.8,
                              "accl_mag_max": 1.2, "gyro_mag_mean": 0.5, "gyro_mag_std": 0.1,
                              "gyro_mag_min": 0.1, "gyro_mag_max": 0.9}),
    ]


def aborted(t: Topics) -> list:
    """An aborted transaction: none of it may ever show."""
    return [
        (t["sessions"], "ghost", started("ghost", T0_US)),
        (t["aggregated"], "s1", aggregate("s1", T0_US, T0_US + 99_000_000, 9999, 999.0)),
        (t["sessions"], "s2", ended("s2", T0_US + 1_000, T0_US + 9_000_000, 1800, "gap")),
    ]


def check_history(sessions: list):
    by_id = {s["session_id"]: s for s in sessions}
    assert set(by_id) == {f"s1_{T0_US}", f"s1_{T0_US + 60_000_000}", f"s2_{T0_US + 1_000}"}, sorted(by_id)
    done = by_id[f"s1_{T0_US}"]
    assert done["active"] is False and done["end_reason"] == "idle"
    assert done["end_us"] == T0_US + 21_000_000
    assert done["aggregate"]["emitted_at_us"] == T0_US + 20_000_000, "the last committed aggregate"
    assert done["aggregate"]["distance_m"] == 30.0
    assert done["sample_count"] == 4200
    s2 = by_id[f"s2_{T0_US + 1_000}"]
    assert s2["active"] is True and s2["end_reason"] is None, "the aborted end never shows"
    assert s2["aggregate"]["distance_m"] == 4.0
    assert by_id[f"s1_{T0_US + 60_000_000}"]["active"] is True
    # Newest start first.
    assert [s["start_us"] for s in sessions] == sorted((s["start_us"] for s in sessions), reverse=True)


def test_replicas_serve_the_same_committed_sessions_and_live_samples(kafka_broker):
    t = Topics(kafka_broker)
    w = ProcessorWriter(kafka_broker)
    w.transaction(history(t))
    w.transaction(aborted(t), commit=False)

    a, b = ApiReplica(kafka_broker, t.env), ApiReplica(kafka_broker, t.env)
    collectors = []
    try:
        for r in (a, b):
            wait_until(r.ready, timeout=60, message="/ready 200 after the catch-up")
            body = r.get("/ready").json()
            assert body["components"]["sessions"]["ok"], body
        sa, sb = a.sessions(), b.sessions()
        check_history(sa)
        assert sa == sb, "both replicas answer the same /sessions"
        for sid in (f"s1_{T0_US}", f"s2_{T0_US + 1_000}"):
            one, two = a.get(f"/sessions/{sid}"), b.get(f"/sessions/{sid}")
            assert one.status_code == two.status_code == 200
            assert one.json() == two.json()
        assert a.get(f"/sessions/ghost_{T0_US}").status_code == 404
        active = a.get("/sessions").json()
        assert {s["session_id"] for s in active} == {f"s1_{T0_US + 60_000_000}", f"s2_{T0_US + 1_000}"}
        assert a.get("/sensors/s1").json()["active_session_id"] == f"s1_{T0_US + 60_000_000}"
        for r in (a, b):
            m = r.get("/metrics").text
            assert f'sensorflow_kafka_records_malformed_total{{topic="{t["sessions"]}"}} 2' in m, m
            assert f'sensorflow_kafka_records_consumed_total{{topic="{t["sessions"]}"}} 4' in m, m
            assert metric(m, "sensorflow_api_caught_up") == 1
            lag = f'sensorflow_kafka_consumer_lag_records{{topic="{t["sessions"]}"}} 0'
            wait_until(lambda: lag in r.get("/metrics").text, timeout=10, message="no lag once caught up")
        assert a.get("/model").status_code == 503
        post = requests.post(a.http + "/model", json={"location": "/nowhere.onnx"}, timeout=10)
        assert post.status_code == 503 and "not implemented" in post.json()["error"]["message"]

        # Live: clients connected before the samples were written get them; a malformed sample
        # message in between is skipped.
        collectors = [WsCollector(r.ws + "/ws/raw/s1") for r in (a, b)]
        for r in (a, b):
            # The hub subscribes a socket right after the upgrade: wait for it, not a while.
            wait_until(lambda: 'sensorflow_hub_topics{kind="raw"} 1' in r.get("/metrics").text, timeout=10,
                       message="the WebSocket subscribed")
        session_b = T0_US + 60_000_000
        w.transaction([
            (t["transformed"], "s1", sample_rows("s1", session_b, 0, 64)),
            (t["transformed"], "s1", b"[{\"sensor_id\":"),
            (t["transformed"], "s1", sample_rows("s1", session_b, 64, 64)),
            (t["sessions"], "s1", ended("s1", session_b, session_b + 640_000, 128, "gap")),
            (t["gaps"], "s1", {"sensor_id": "s1", "from_index": 128, "to_index": 192, "missing": 64,
                               "detected_at_us": session_b + 2_000_000}),
        ])
        w.transaction([(t["transformed"], "s1", sample_rows("s1", session_b, 1000, 5))], commit=False)
        for c in collectors:
            wait_until(lambda: len(c.rows()) >= 128, timeout=30, message="128 live samples on /ws/raw/s1")
            rows = c.rows()
            assert [r["sample_index"] for r in rows] == list(range(128)), "in order, no aborted row"
            assert rows[0]["model_version"] == "test-1" and rows[0]["session_id"] == f"s1_{session_b}"
        for r in (a, b):
            wait_until(lambda: r.get(f"/sessions/s1_{session_b}").json()["end_reason"] == "gap", timeout=30,
                       message="the live end of s1's second session")
            s1 = r.get("/sensors/s1").json()
            assert s1["samples_decoded"] == 128 and s1["packets_decoded"] == 2
            assert s1["active_session_id"] is None
            wait_until(lambda: r.get("/sensors/s1").json()["missing_samples"] == 64, timeout=10,
                       message="the live gap counted")
            wait_until(lambda: f'sensorflow_kafka_records_malformed_total{{topic="{t["transformed"]}"}} 1'
                       in r.get("/metrics").text, timeout=10, message="the malformed sample message counted")
            assert r.ready()
        assert a.sessions() == b.sessions()
    finally:
        for c in collectors:
            c.close()
        assert a.stop() == 0, "\n".join(a.log_lines[-30:])
        assert b.stop() == 0, "\n".join(b.log_lines[-30:])


def test_a_restarted_replica_is_not_ready_until_it_caught_up_then_answers_the_same(kafka_broker):
    t = Topics(kafka_broker)
    w = ProcessorWriter(kafka_broker)
    w.transaction(history(t))
    w.transaction(aborted(t), commit=False)
    a = ApiReplica(kafka_broker, t.env)
    b = None
    try:
        wait_until(a.ready, timeout=60, message="first replica ready")
        before = a.sessions()
        check_history(before)
        assert a.stop() == 0
        # While the broker does not answer, the restarted replica serves HTTP but is not ready.
        kafka_broker.pause()
        try:
            b = ApiReplica(kafka_broker, t.env)
            not_ready = [b.get("/ready") for _ in range(3)]
            assert all(r.status_code == 503 for r in not_ready), [r.text for r in not_ready]
            assert not not_ready[-1].json()["components"]["sessions"]["ok"]
        finally:
            kafka_broker.resume()
        wait_until(b.ready, timeout=90, message="/ready 200 once the broker is back and the catch-up is done")
        assert b.sessions() == before, "a restarted replica answers the same /sessions"
        a = ApiReplica(kafka_broker, t.env)
        wait_until(a.ready, timeout=60, message="restarted replica ready")
        assert a.sessions() == before
    finally:
        assert a.stop() == 0, "\n".join(a.log_lines[-30:])
        if b is not None:
            assert b.stop() == 0, "\n".join(b.log_lines[-30:])
