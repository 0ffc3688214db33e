"""`sensorflow gateway` against a real Kafka broker (the session's `kafka_broker`): every
acknowledged MQTT publish is in the ingest topic exactly once, as the ingest record, keyed by
sensor id; a broker outage withholds PUBACKs instead of losing or doubling anything."""

import struct
import threading
import time
import uuid

from confluent_kafka.admin import AdminClient

from testkit import (
    Platform,
    Publisher,
    decode_ingest_record,
    encode_packet,
    json_packet,
    metric,
    read_topic,
    synthetic_samples,
    wait_until,
)

T0_US = 1_760_000_000_000_000


def start_gateway(broker, env=None) -> Platform:
    return Platform(
        None,
        command="gateway",
        extra_args=["--kafka-brokers", broker.bootstrap],
        env=env,
    )


def packet(i: int) -> bytes:
    return encode_packet(i * 64, T0_US + i * 64 * 5000, synthetic_samples(64, seed=i))


def base_of(record: dict) -> int:
    """The base sample number of the binary packet a record carries (offset 4 of the packet)."""
    return struct.unpack_from("<I", record["payload"], 4)[0]


def check_exactly_once(broker, topic, pub: Publisher, payloads: dict):
    """Every acknowledged publish is in `topic` exactly once with its bytes as sent, keyed by
    its sensor; nothing is there that was never published."""
    records = read_topic(broker.bootstrap, topic)
    seen: dict = {}
    for m in records:
        r = decode_ingest_record(m.value())
        assert m.key().decode() == r["sensor_id"], "the key is the sensor id"
        key = (r["sensor_id"], base_of(r))
        assert key in pub.published, f"{key} is in Kafka but was never published"
        assert r["payload"] == payloads[key], f"{key}: payload differs from what was published"
        assert r["format"] == "binary"
        seen[key] = seen.get(key, 0) + 1
    by_sensor: dict = {}
    for m in records:
        r = decode_ingest_record(m.value())
        by_sensor.setdefault(r["sensor_id"], []).append((m.partition(), m.offset(), base_of(r)))
    for sid, rows in by_sensor.items():
        assert len({p for p, _, _ in rows}) == 1, f"{sid}: one partition per key"
        bases = [b for _, _, b in sorted(rows, key=lambda x: x[1])]
        assert bases == sorted(bases), f"{sid}: records out of publish order"
    doubled = {k: n for k, n in seen.items() if n > 1}
    assert not doubled, f"records in Kafka more than once: {sorted(doubled)[:10]}"
    missing = set(pub.acked) - set(seen)
    assert not missing, f"{len(missing)} acknowledged publishes are not in Kafka: {sorted(missing)[:10]}"
    return records


def test_every_acknowledged_publish_is_one_ingest_record_keyed_by_sensor(kafka_broker):
    gw = start_gateway(kafka_broker)
    pub = Publisher(gw.mqtt_host, gw.mqtt_port)
    try:
        sensors = [f"gw-{k}" for k in range(5)]
        payloads = {}
        before_us = time.time_ns() // 1000
        for i in range(40):
            for sid in sensors:
                payloads[(sid, i * 64)] = packet(i)
                pub.publish(sid, (sid, i * 64), payloads[(sid, i * 64)])
        # One JSON packet and one publish on a topic no pattern matches.
        jpayload = json_packet(10_000, T0_US, synthetic_samples(4, seed=1))
        pub.publish("gw-json", ("gw-json", "json"), jpayload, topic="sensors/gw-json/data")
        pub.publish("gw-0", ("gw-0", "junk"), b"junk", topic="nowhere/gw-0")
        # Oversize (mqtt.max_message_bytes = 256 KiB): counted for its sensor, not produced.
        pub.publish("gw-big", ("gw-big", "big"), b"x" * 300_000)
        pub.wait_all_acked(timeout=60)
        after_us = time.time_ns() // 1000

        records = read_topic(kafka_broker.bootstrap, "imu-data-all")
        by_sensor: dict = {}
        for m in records:
            r = decode_ingest_record(m.value())
            assert m.key().decode() == r["sensor_id"]
            assert before_us - 1_000_000 <= r["ingest_us"] <= after_us + 1_000_000, "ingest_us is the receive time"
            # Kafka's timestamp is the receive time in ms.
            assert abs(m.timestamp()[1] - r["ingest_us"] // 1000) <= 1
            by_sensor.setdefault(r["sensor_id"], []).append((m.partition(), m.offset(), r))
        json_records = [r for _, _, r in by_sensor.pop("gw-json")]
        assert len(json_records) == 1 and json_records[0]["format"] == "json"
        assert json_records[0]["payload"] == jpayload
        assert set(by_sensor) == set(sensors), "the unknown topic's message is not in Kafka"
        for sid, rows in by_sensor.items():
            assert len({p for p, _, _ in rows}) == 1, f"{sid}: one partition per key"
            rows.sort(key=lambda x: x[1])
            bases = [base_of(r) for _, _, r in rows]
            assert bases == [i * 64 for i in range(40)], f"{sid}: every packet once, in order"
            for _, _, r in rows:
                assert r["payload"] == payloads[(sid, base_of(r))] and r["format"] == "binary"

        md = AdminClient({"bootstrap.servers": kafka_broker.bootstrap}).list_topics("imu-data-all", timeout=10)
        assert len(md.topics["imu-data-all"].partitions) == 12, "created with kafka.partitions (default 12)"

        m = gw.get("/metrics").text
        assert metric(m, "sensorflow_kafka_records_produced_total") == 201
        assert metric(m, "sensorflow_kafka_produce_errors_total") == 0
        assert metric(m, "sensorflow_kafka_in_flight_records") == 0
        assert 'sensorflow_ingest_rejected_total{reason="unknown_topic"} 1' in m
        assert 'sensorflow_sensor_bad_input_total{sensor_id="gw-big",reason="oversize"} 1' in m
        ready = gw.get("/ready")
        assert ready.status_code == 200 and ready.json()["components"]["kafka"]["ok"]
        assert any("http listening on" in line for line in gw.log_lines)
    except BaseException:
        # An intermittent failure (not all publishes acknowledged within 60 s) was seen once in
        # a full suite run: show what the gateway saw.
        unacked = sorted(pub.published - set(pub.acked))
        print(f"unacknowledged ({len(unacked)}): {unacked[:20]}\n--- gateway /metrics:\n{gw.get('/metrics').text}"
              "\n" + gw.log_tail(60))
        raise
    finally:
        pub.close()
        assert gw.stop() == 0, "\n".join(gw.log_lines[-30:])


def test_a_broker_outage_withholds_pubacks_and_loses_or_doubles_nothing(kafka_broker):
    topic = f"imu-data-outage-{uuid.uuid4().hex[:8]}"
    # A producer queue of 50 records: the outage fills it, so records also take the path that
    # waits for room (in order) instead of failing.
    gw = start_gateway(
        kafka_broker,
        env={
            "SENSORFLOW_KAFKA_TOPICS_INGEST": topic,
            "SENSORFLOW_KAFKA_PARTITIONS": "3",
            "SENSORFLOW_KAFKA_CLIENT_QUEUE_BUFFERING_MAX_MESSAGES": "50",
        },
    )
    pub = Publisher(gw.mqtt_host, gw.mqtt_port)
    sensors = [f"out-{k}" for k in range(3)]
    payloads: dict = {}
    stop = threading.Event()
    errors: list = []

    def publish_loop():
        try:
            i = 0
            while not stop.is_set():
                for sid in sensors:
                    payloads[(sid, i * 64)] = packet(i)
                    pub.publish(sid, (sid, i * 64), payloads[(sid, i * 64)])
                i += 1
                time.sleep(0.02)
        except Exception as e:  # reported by the test below
            errors.append(e)

    thread = threading.Thread(target=publish_loop, daemon=True)
    paused = stopped = False
    try:
        thread.start()
        wait_until(lambda: len(pub.acked) >= 100, timeout=60, message="100 acknowledged publishes")

        # 1. A hung broker (SIGSTOP): acknowledgements stop, the gateway stays up and unready.
        kafka_broker.pause()
        paused = True
        time.sleep(2)  # acknowledgements of records Kafka had already taken may still arrive
        acked_at_pause, unacked_at_pause = len(pub.acked), pub.unacked()
        wait_until(lambda: gw.get("/ready").status_code == 503, timeout=15, message="/ready 503 while kafka hangs")
        time.sleep(4)
        assert len(pub.acked) == acked_at_pause, "no PUBACK while Kafka cannot acknowledge"
        assert pub.unacked() > unacked_at_pause, "publishing went on, unacknowledged"
        assert gw.proc.poll() is None, "the gateway did not crash"
        m = gw.get("/metrics").text
        assert metric(m, "sensorflow_kafka_in_flight_records") > 50
        assert metric(m, "sensorflow_kafka_queue_full_total") > 0, "the producer queue filled up"
        assert metric(m, "sensorflow_kafka_produce_errors_total") == 0, "a full queue is waited on, not an error"
        kafka_broker.resume()
        paused = False
        wait_until(lambda: len(pub.acked) > acked_at_pause + 50, timeout=60, message="PUBACKs resume")
        wait_until(lambda: gw.get("/ready").status_code == 200, timeout=30, message="/ready 200 again")

        # 2. A broker restart (SIGTERM, start again): the idempotent producer's retries double nothing.
        kafka_broker.stop()
        stopped = True
        acked_at_stop = len(pub.acked)
        time.sleep(3)
        assert len(pub.acked) <= acked_at_stop + 50, "at most what Kafka had acknowledged before it stopped"
        held = len(pub.acked)
        time.sleep(2)
        assert len(pub.acked) == held, "no PUBACK while the broker is down"
        assert gw.proc.poll() is None
        kafka_broker.start()
        stopped = False
        wait_until(lambda: len(pub.acked) > held + 50, timeout=90, message="PUBACKs after the restart")

        stop.set()
        thread.join(timeout=10)
        assert not errors, errors
        pub.wait_all_acked(timeout=120)
        records = check_exactly_once(kafka_broker, topic, pub, payloads)
        assert len(records) == len(pub.published)
        m = gw.get("/metrics").text
        assert metric(m, "sensorflow_kafka_records_produced_total") == len(pub.published)
        assert metric(m, "sensorflow_kafka_in_flight_records") == 0
    finally:
        stop.set()
        if paused:
            kafka_broker.resume()
        if stopped or kafka_broker.proc.poll() is not None:
            kafka_broker.start()
        pub.close()
        code = gw.stop()
        assert code == 0, "\n".join(gw.log_lines[-30:])
