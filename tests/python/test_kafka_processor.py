"""`sensorflow processor` against a real Kafka broker and a real S3-compatible server: a
gateway, processors joining and dying mid-run, an api replica, and the outputs checked with real
clients (confluent-kafka reading read_committed, pyarrow reading the S3 lake) against a reference
run of one processor that was never disturbed."""

import json
import time
import uuid

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import requests

from testkit import (
    Platform,
    Publisher,
    encode_packet,
    metric,
    processor_config,
    read_topic_to_end,
    synthetic_samples,
    wait_for_sample_rows,
    wait_until,
)

SENSORS = 30
ROUNDS = 48
SAMPLES = 64
# 64 samples at 200 Hz: one packet per sensor every 320 ms.
PACKET_S = SAMPLES / 200


def start_processor(broker, s3, tmp_path, name: str, config: str, lake: str) -> Platform:
    return Platform(
        tmp_path / name,
        command="processor",
        extra_args=["--config", config, "--kafka-brokers", broker.bootstrap, "--lake", lake],
        env=s3.env,
        mqtt=False,
    )


def lake_rows(s3, bucket: str, prefix: str) -> list[dict]:
    fs = pafs.S3FileSystem(
        endpoint_override=s3.endpoint.removeprefix("http://"),
        scheme="http",
        access_key=s3.ACCESS_KEY,
        secret_key=s3.SECRET_KEY,
        region=s3.REGION,
    )
    dataset = ds.dataset(f"{bucket}/{prefix}/samples", filesystem=fs, format="parquet", partitioning="hive")
    return dataset.to_table(columns=["sensor_id", "sample_index", "session_id", "velocity_pred"]).to_pylist()


def last_aggregates(broker, topic: str) -> dict:
    """The newest aggregate of each session (by emission time)."""
    newest: dict = {}
    for m in read_topic_to_end(broker.bootstrap, topic):
        a = json.loads(m.value())
        if a["session_id"] not in newest or a["emitted_at_us"] > newest[a["session_id"]]["emitted_at_us"]:
            newest[a["session_id"]] = a
    return newest


def test_processors_scale_out_and_fail_over_exactly_once_with_their_state(kafka_broker, s3_server, tmp_path):
    uid = uuid.uuid4().hex[:8]
    ingest = f"ingest-{uid}"
    bucket = s3_server.new_bucket("lake")
    cluster = processor_config(tmp_path, "cluster", uid, ingest=ingest)
    reference = processor_config(tmp_path, "reference", f"ref{uid}", ingest=ingest)
    gateway = Platform(None, command="gateway", extra_args=["--config", cluster, "--kafka-brokers", kafka_broker.bootstrap])
    processors = [start_processor(kafka_broker, s3_server, tmp_path, f"p{i}", cluster, f"s3://{bucket}/cluster") for i in (1, 2)]
    api = Platform(None, command="api", extra_args=["--config", cluster, "--kafka-brokers", kafka_broker.bootstrap], mqtt=False)
    pub = Publisher(gateway.mqtt_host, gateway.mqtt_port)
    sensors = [f"eo-{k:02d}" for k in range(SENSORS)]
    t0_us = time.time_ns() // 1000 - 60_000_000
    try:
        wait_until(lambda: all(metric(p.get("/metrics").text, "sensorflow_processor_partitions") > 0 for p in processors), timeout=90, message="both processors own partitions")
        killed = None
        next_round = time.monotonic()
        for i in range(ROUNDS):
            for k, sid in enumerate(sensors):
                base = i * SAMPLES
                pub.publish(sid, (sid, base), encode_packet(base, t0_us + int(i * PACKET_S * 1e6), synthetic_samples(SAMPLES, seed=k * 1000 + i)))
            if i == ROUNDS // 3:
                # Scale 2 -> 3 while publishing.
                processors.append(start_processor(kafka_broker, s3_server, tmp_path, "p3", cluster, f"s3://{bucket}/cluster"))
            if i == 2 * ROUNDS // 3:
                # The first processor dies with whatever transaction it has open.
                wait_until(lambda: metric(processors[0].get("/metrics").text, "sensorflow_processor_commits_total") > 0, timeout=30, message="p1 committed")
                processors[0].kill()
                killed = processors.pop(0)
            next_round += PACKET_S
            time.sleep(max(0.0, next_round - time.monotonic()))
        pub.wait_all_acked(timeout=60)
        assert killed is not None
        expected = {(sid, base + j) for sid, base in pub.acked for j in range(SAMPLES)}
        assert len(expected) == SENSORS * ROUNDS * SAMPLES

        # Kafka: every acknowledged sample exactly once in sensor-data-transformed (read_committed).
        rows = wait_for_sample_rows(kafka_broker.bootstrap, f"transformed-{uid}", expected, timeout=120,
                                    message="every acknowledged sample in the transformed topic")
        keys = [(r["sensor_id"], r["sample_index"]) for r in rows]
        assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} samples doubled in Kafka"
        assert set(keys) == expected

        # The api role lists every sensor's session, as the samples name them.
        sessions = {r["session_id"] for r in rows}

        def api_sessions():
            listed = api.get("/sessions?active=any&limit=1000").json()
            return {s["session_id"] for s in listed} == sessions

        wait_until(api_sessions, timeout=60, interval=0.5, message="the api lists every session")

        # A reference run: one undisturbed processor over the same ingest topic.
        ref = start_processor(kafka_broker, s3_server, tmp_path, "ref", reference, f"s3://{bucket}/reference")
        try:
            # Ready once it created its topics, joined its group and committed.
            wait_until(lambda: ref.get("/ready").status_code == 200, timeout=60, message="the reference processor ready")
            ref_rows = wait_for_sample_rows(kafka_broker.bootstrap, f"transformed-ref{uid}", expected, timeout=180,
                                            interval=2, message="the reference run processed everything")
            # Sessions and model state moved with their partitions: the same session per
            # sensor and the same predictions as without the rebalance and the kill.
            by_key = {(r["sensor_id"], r["sample_index"]): r for r in rows}
            differ = []
            for r in ref_rows:
                mine = by_key[(r["sensor_id"], r["sample_index"])]
                if mine["session_id"] != r["session_id"] or abs(mine["velocity_pred"] - r["velocity_pred"]) > 1e-4 or abs(mine["movement_prob"] - r["movement_prob"]) > 1e-4:
                    differ.append((mine, r))
            assert not differ, f"{len(differ)} samples differ from the undisturbed run, e.g. {differ[:2]}"
            assert len({r["session_id"] for r in rows}) == SENSORS, "one session per sensor"

            # Session aggregates (the newest of each session) equal the undisturbed run's.
            def settled(topic):
                newest = last_aggregates(kafka_broker, topic)
                return newest if len(newest) == SENSORS and all(a["sample_count"] == ROUNDS * SAMPLES for a in newest.values()) else None

            mine = wait_until(lambda: settled(f"aggregated-{uid}"), timeout=60, message="final aggregates")
            theirs = wait_until(lambda: settled(f"aggregated-ref{uid}"), timeout=60, message="final reference aggregates")
            for sid, a in mine.items():
                b = theirs[sid]
                for field in ("sample_count", "max_velocity", "distance_m", "mean_velocity", "moving_time_s", "duration_s"):
                    assert abs(a[field] - b[field]) <= 1e-6 * max(1.0, abs(b[field])), f"{sid} {field}: {a[field]} vs {b[field]}"
        finally:
            ref.stop()

        # The lake: a clean stop commits everything; every sample exactly once in S3.
        for p in processors:
            assert p.stop() == 0
        lake = lake_rows(s3_server, bucket, "cluster")
        lake_keys = [(r["sensor_id"], r["sample_index"]) for r in lake]
        assert len(lake_keys) == len(set(lake_keys)), f"{len(lake_keys) - len(set(lake_keys))} samples doubled in the lake"
        assert set(lake_keys) == expected, f"{len(expected - set(lake_keys))} acknowledged samples missing from the lake"
    except BaseException:
        for p in processors + [gateway, api]:
            print(p.log_tail())
        raise
    finally:
        pub.close()
        for p in processors:
            p.stop()
        gateway.stop()
        api.stop()


def test_a_record_that_fails_a_stage_is_a_dead_letter_and_the_processor_moves_on(kafka_broker, tmp_path):
    """The fail point makes a step panic on any record of sensor "poison", as an operator bug
    triggered by one record's data would: the transaction aborts, the partitions rewind, the
    record is found alone and set aside into `quarantine`, and everything else is exactly once."""
    uid = uuid.uuid4().hex[:8]
    config = processor_config(tmp_path, "poison", uid)
    gateway = Platform(None, command="gateway", extra_args=["--config", config, "--kafka-brokers", kafka_broker.bootstrap])
    lake = tmp_path / "lake"
    processor = Platform(tmp_path / "p", command="processor", mqtt=False,
                         extra_args=["--config", config, "--kafka-brokers", kafka_broker.bootstrap, "--lake", str(lake)],
                         env={"FAILPOINTS": "pipeline-poison=return(poison)"})
    pub = Publisher(gateway.mqtt_host, gateway.mqtt_port)
    now_us = time.time_ns() // 1000
    poison = encode_packet(0, now_us, synthetic_samples(SAMPLES, seed=2))
    try:
        for i in range(20):
            for sid in ("good-1", "good-2"):
                pub.publish(sid, (sid, i * SAMPLES), encode_packet(i * SAMPLES, now_us + i * 320_000, synthetic_samples(SAMPLES, seed=i)))
            if i == 10:
                pub.publish("poison", ("poison", 0), poison)
        pub.wait_all_acked(timeout=60)
        wait_until(lambda: metric(processor.get("/metrics").text, "sensorflow_processor_dead_letters_total") >= 1,
                   timeout=60, message="the poisoned record set aside")
        expected = {(sid, base + j) for sid, base in pub.acked if sid != "poison" for j in range(SAMPLES)}
        rows = wait_for_sample_rows(kafka_broker.bootstrap, f"transformed-{uid}", expected, timeout=60,
                                    message="every good sample in the transformed topic")
        keys = [(r["sensor_id"], r["sample_index"]) for r in rows]
        assert len(keys) == len(set(keys)), "samples doubled by the rewinds"
        assert set(keys) == expected, "the poisoned sensor's samples never come out"
        text = processor.get("/metrics").text
        assert metric(text, "sensorflow_processor_rewinds_total") >= 1
        assert metric(text, "sensorflow_processor_dead_letters_total") >= 1
    except BaseException:
        for p in (processor, gateway):
            print(p.log_tail())
        raise
    finally:
        pub.close()
        assert processor.stop() == 0
        gateway.stop()
    letters = ds.dataset(str(lake / "quarantine"), format="parquet", partitioning="hive").to_table().to_pylist()
    stage_failed = [r for r in letters if r["reason"] == "stage_failed"]
    assert len(stage_failed) == 1, "set aside once, whatever the rewinds"
    assert stage_failed[0]["sensor_id"] == "poison"
    assert stage_failed[0]["payload"] == poison, "kept as received"
    assert "pipeline-poison" in stage_failed[0]["detail"]
    samples = ds.dataset(str(lake / "samples"), format="parquet", partitioning="hive").to_table(columns=["sensor_id", "sample_index"]).to_pylist()
    lake_keys = [(r["sensor_id"], r["sample_index"]) for r in samples]
    assert len(lake_keys) == len(set(lake_keys)) and set(lake_keys) == expected


def test_a_processor_stuck_in_a_commit_is_stopped_by_its_watchdog_and_its_successor_loses_nothing(kafka_broker, tmp_path):
    """The fail point stalls the processor's third commit with data where librdkafka's
    coordinator hang waits (`send_offsets_to_transaction`, upstream issues 5456/5511): `/ready`
    names the step, the watchdog exits the process with status 70 once the step has lasted
    `stall_timeout_ms`, and a processor started in its place (same instance id: it aborts the
    stuck transaction at once) ends with every sample exactly once, in the topic and the lake."""
    uid = uuid.uuid4().hex[:8]
    instance = f"stall-{uid}"
    stalling = processor_config(tmp_path, "stalling", uid, instance=instance, stall_timeout_ms=5000)
    successor_config = processor_config(tmp_path, "successor", uid, instance=instance)
    gateway = Platform(None, command="gateway", extra_args=["--config", successor_config, "--kafka-brokers", kafka_broker.bootstrap])
    lake = tmp_path / "lake"

    def processor(name: str, config: str, env: dict | None = None) -> Platform:
        return Platform(tmp_path / name, command="processor", mqtt=False, env=env,
                        extra_args=["--config", config, "--kafka-brokers", kafka_broker.bootstrap, "--lake", str(lake)])

    stuck = processor("stuck", stalling, {"FAILPOINTS": "processor-commit-stall=2*off->1*sleep(600000)"})
    successor = None
    pub = Publisher(gateway.mqtt_host, gateway.mqtt_port)
    now_us = time.time_ns() // 1000
    sent = 0

    def publish_round():
        nonlocal sent
        for sid in ("s-1", "s-2", "s-3"):
            pub.publish(sid, (sid, sent * SAMPLES),
                        encode_packet(sent * SAMPLES, now_us + sent * 320_000, synthetic_samples(SAMPLES, seed=sent)))
        sent += 1

    seen_stalled: dict = {}

    def stalled_step_reported():
        try:
            component = stuck.get("/ready").json()["components"]["processor"]
        except (requests.ConnectionError, ValueError):
            return False
        if component["step"] == "committing" and component["step_seconds"] >= 1:
            seen_stalled.update(component)
        return bool(seen_stalled)

    try:
        wait_until(lambda: stuck.get("/ready").status_code == 200, timeout=60, message="the first processor ready")
        # Devices keep sending at their own pace (one packet per sensor every 200 ms) while the
        # processor stalls and dies: what arrives meanwhile waits in the ingest topic.
        deadline = time.monotonic() + 90
        while stuck.proc.poll() is None and time.monotonic() < deadline:
            publish_round()
            stalled_step_reported()
            time.sleep(0.2)
        assert stuck.proc.wait(timeout=30) == 70, "the watchdog's exit status"
        assert seen_stalled, "/ready never showed the stalled step"
        assert any("the processor is stuck: no progress while committing" in line for line in stuck.log_lines)
        for _ in range(5):
            publish_round()
        successor = processor("successor", successor_config)
        for _ in range(5):
            publish_round()
        pub.wait_all_acked(timeout=60)
        expected = {(sid, base + j) for sid, base in pub.acked for j in range(SAMPLES)}
        rows = wait_for_sample_rows(kafka_broker.bootstrap, f"transformed-{uid}", expected, timeout=90,
                                    message="every sample in the transformed topic")
        keys = [(r["sensor_id"], r["sample_index"]) for r in rows]
        assert len(keys) == len(set(keys)), "samples of the stuck transaction doubled"
        assert set(keys) == expected
    except BaseException:
        for p in (stuck, successor, gateway):
            if p is not None:
                print(p.log_tail())
        raise
    finally:
        pub.close()
        if stuck.proc.poll() is None:
            stuck.kill()
        if successor is not None:
            assert successor.stop() == 0
        gateway.stop()
    samples = ds.dataset(str(lake / "samples"), format="parquet", partitioning="hive").to_table(columns=["sensor_id", "sample_index"]).to_pylist()
    lake_keys = [(r["sensor_id"], r["sample_index"]) for r in samples]
    assert len(lake_keys) == len(set(lake_keys)), "lake files of the stuck transaction kept"
    assert set(lake_keys) == expected
