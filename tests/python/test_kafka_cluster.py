"""Distributed mode on a real 3-node Apache Kafka cluster (KRaft, every node broker and
controller, replication factor 3, min.insync.replicas 2): a gateway and two processors while
MQTT devices publish QoS 1, and one node killed with SIGKILL mid-run. The node is chosen to
hurt: the active controller, the leader of some ingest partitions, the coordinator of the
processors' consumer group and of both processors' transactions. Publishing goes on through
the failover; real Kafka clients (read_committed) then find every acknowledged publish exactly
once in the ingest topic and every acknowledged sample exactly once in the transformed topic
and in the lake."""

import collections
import struct
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from confluent_kafka import TopicCollection

from testkit import (
    KafkaCluster,
    Platform,
    Publisher,
    check_lake_exactly_once,
    coordinator_partition,
    decode_ingest_record,
    encode_packet,
    metric,
    processor_config,
    read_topic,
    sample_rows,
    synthetic_samples,
    wait_for_sample_rows,
    wait_until,
)

SENSORS = 12
ROUNDS = 72
SAMPLES = 64
# 64 samples at 200 Hz: one packet per sensor every 320 ms.
PACKET_S = SAMPLES / 200
KILL_ROUND = ROUNDS // 4
# A third processor starts this many rounds after the kill, while the node is still dead.
JOIN_ROUND = KILL_ROUND + 8
OUTPUTS = ("transformed", "aggregated", "sessions", "windows", "gaps", "late", "state")


_ADMINS: dict = {}


def admin(cluster: KafkaCluster) -> AdminClient:
    """One admin client per cluster: a client dropped while a request is in flight never
    completes the request's future."""
    if cluster.bootstrap not in _ADMINS:
        _ADMINS[cluster.bootstrap] = AdminClient({"bootstrap.servers": cluster.bootstrap, "log_level": 0})
    return _ADMINS[cluster.bootstrap]


def describe(cluster: KafkaCluster, topics: list[str]) -> dict:
    """{topic: [(partition, leader id, replica ids, isr ids)]}."""
    futures = admin(cluster).describe_topics(TopicCollection(topics), request_timeout=15)
    return {
        t: [(p.id, p.leader.id if p.leader else None, [r.id for r in p.replicas], [r.id for r in p.isr]) for p in f.result(timeout=20).partitions]
        for t, f in futures.items()
    }


def fully_replicated(cluster: KafkaCluster, topics: list[str]) -> dict | None:
    """The topics' partitions if each has a leader and all 3 replicas in sync, else None."""
    try:
        parts = describe(cluster, topics)
    except Exception:
        return None
    ok = all(leader is not None and len(isr) == 3 for ps in parts.values() for _, leader, _, isr in ps)
    return parts if ok else None


def create_internal_topics(cluster: KafkaCluster, uid: str):
    """`__transaction_state` and `__consumer_offsets` exist once a transactional producer and a
    group have looked up their coordinators; created here so the processors' ids can be chosen
    by the leaders of their partitions."""
    p = Producer({"bootstrap.servers": cluster.bootstrap, "transactional.id": f"warmup-{uid}", "log_level": 0})
    p.init_transactions(60)

    def group_coordinator_found():
        try:
            return admin(cluster).describe_consumer_groups([f"warmup-{uid}"])[f"warmup-{uid}"].result(timeout=5).coordinator
        except Exception:
            return None

    wait_until(group_coordinator_found, timeout=60, interval=0.5, message="a group coordinator")
    return wait_until(lambda: fully_replicated(cluster, ["__consumer_offsets", "__transaction_state"]), timeout=60, interval=0.5,
                      message="the internal topics fully replicated")


def id_coordinated_by(prefix: str, node: int, leaders: dict, partitions: int, key=lambda s: s) -> str:
    """The first `{prefix}-{n}` whose coordinator partition is led by `node`."""
    for n in range(10_000):
        candidate = f"{prefix}-{n}"
        if leaders[coordinator_partition(key(candidate), partitions)] == node:
            return candidate
    raise AssertionError(f"no id with prefix {prefix} is coordinated by node {node}")


def check_replication(cluster: KafkaCluster, topics: list[str]):
    """Every partition of `topics` has 3 replicas; every topic min.insync.replicas = 2."""
    for topic, parts in describe(cluster, topics).items():
        assert len(parts) > 0, topic
        for p, _, replicas, _ in parts:
            assert len(replicas) == 3, f"{topic}[{p}] has replicas {replicas}"
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    for resource, f in admin(cluster).describe_configs(resources, request_timeout=15).items():
        value = f.result(timeout=20)["min.insync.replicas"].value
        assert value == "2", f"{resource.name}: min.insync.replicas = {value}"


def test_a_killed_node_of_a_three_node_cluster_loses_or_doubles_no_acknowledged_sample(tmp_path):
    uid = uuid.uuid4().hex[:8]
    t_start = time.monotonic()
    cluster = KafkaCluster(tmp_path / "kafka")
    gateway = None
    processors: list[Platform] = []
    pub = None
    try:
        print(f"cluster of 3 up in {time.monotonic() - t_start:.1f} s")
        internal = create_internal_topics(cluster, uid)
        victim = cluster.controller_leader()
        n = cluster.internal_partitions
        offsets_leaders = {p: leader for p, leader, _, _ in internal["__consumer_offsets"]}
        txn_leaders = {p: leader for p, leader, _, _ in internal["__transaction_state"]}
        group = id_coordinated_by(f"processors-{uid}", victim, offsets_leaders, n)
        instances = [id_coordinated_by(f"p{i}-{uid}", victim, txn_leaders, n, key=lambda s: f"sensorflow-processor-{s}") for i in (1, 2)]
        instances.append(f"p3-{uid}")
        configs = [
            processor_config(tmp_path, f"p{i + 1}", uid, group=group, instance=inst, replication_factor=3)
            for i, inst in enumerate(instances)
        ]
        lake = tmp_path / "lake"
        # The victim first in the platform's bootstrap list: a client started after the kill
        # tries the dead node first.
        others = [b.bootstrap for b in cluster.brokers if b.node_id != victim]
        brokers = ",".join([cluster.broker(victim).bootstrap] + others)

        def start_processor(i: int) -> Platform:
            return Platform(tmp_path / f"p{i + 1}", command="processor",
                            extra_args=["--config", configs[i], "--kafka-brokers", brokers, "--lake", str(lake)], mqtt=False)

        gateway = Platform(None, command="gateway", extra_args=["--config", configs[0], "--kafka-brokers", brokers])
        processors += [start_processor(0), start_processor(1)]
        wait_until(lambda: all(metric(p.get("/metrics").text, "sensorflow_processor_partitions") > 0 for p in processors), timeout=60,
                   message="both processors own partitions")

        # The topics as created by the platform (kafka.replication_factor = 3) and the cluster's
        # internal ones: 3 replicas each, min.insync.replicas 2.
        topics = [f"ingest-{uid}"] + [f"{t}-{uid}" for t in OUTPUTS]
        check_replication(cluster, topics + ["__consumer_offsets", "__transaction_state"])
        # The victim coordinates the group (as the cluster says) and both transactions (by
        # Kafka's partitioning of transactional ids), and leads some ingest partitions.
        coordinator = admin(cluster).describe_consumer_groups([group])[group].result(timeout=20).coordinator.id
        assert coordinator == victim, f"group coordinator {coordinator}, expected {victim}"
        ingest_led = [p for p, leader, _, _ in describe(cluster, [f"ingest-{uid}"])[f"ingest-{uid}"] if leader == victim]
        assert ingest_led, f"node {victim} leads no ingest partition"
        print(f"victim: node {victim}, active controller, coordinator of group {group} and of transactions {instances[:2]}, "
              f"leader of ingest partitions {ingest_led}")

        pub = Publisher(gateway.mqtt_host, gateway.mqtt_port)
        sensors = [f"kc-{k:02d}" for k in range(SENSORS)]
        t0_us = time.time_ns() // 1000 - 60_000_000
        killed_at = None
        published_after_kill = 0
        sent: dict = {}
        next_round = time.monotonic()
        for i in range(ROUNDS):
            if i == KILL_ROUND:
                wait_until(lambda: all(metric(p.get("/metrics").text, "sensorflow_processor_commits_total") > 0 for p in processors),
                           timeout=30, message="both processors committed")
                cluster.broker(victim).kill()
                killed_at = time.monotonic()
            if i == JOIN_ROUND:
                # Scale 2 -> 3 during the outage: the newcomer restores its share of the
                # partitions from the changelog with a node of its bootstrap list dead.
                processors.append(start_processor(2))
            for k, sid in enumerate(sensors):
                base = i * SAMPLES
                sent[(sid, base)] = time.monotonic()
                pub.publish(sid, (sid, base), encode_packet(base, t0_us + int(i * PACKET_S * 1e6), synthetic_samples(SAMPLES, seed=k * 1000 + i)))
                published_after_kill += killed_at is not None
            next_round += PACKET_S
            time.sleep(max(0.0, next_round - time.monotonic()))
        pub.wait_all_acked(timeout=90)
        assert published_after_kill == (ROUNDS - KILL_ROUND) * SENSORS
        withheld = max(pub.acked[k] - sent[k] for k in pub.acked)
        print(f"published {len(pub.published)} packets, {published_after_kill} after the kill; PUBACKs withheld up to {withheld:.1f} s")
        acked = set(pub.acked)
        assert len(acked) == SENSORS * ROUNDS

        # The ingest topic: every acknowledged publish exactly once, keyed by its sensor.
        seen = collections.Counter()
        for m in read_topic(cluster.bootstrap, f"ingest-{uid}", idle_s=1.0):
            record = decode_ingest_record(m.value())
            assert m.key().decode() == record["sensor_id"]
            seen[(record["sensor_id"], struct.unpack_from("<I", record["payload"], 4)[0])] += 1
        doubled = {k: c for k, c in seen.items() if c > 1}
        assert not doubled, f"{len(doubled)} publishes more than once in the ingest topic, e.g. {list(doubled.items())[:5]}"
        assert set(seen) == acked, f"{len(acked - set(seen))} acknowledged publishes missing from the ingest topic, e.g. {sorted(acked - set(seen))[:5]}"

        # The transformed topic (read_committed): every acknowledged sample exactly once.
        expected = {(sid, base + j) for sid, base in acked for j in range(SAMPLES)}
        rows = wait_for_sample_rows(cluster.bootstrap, f"transformed-{uid}", expected, timeout=90,
                                    message="every acknowledged sample in the transformed topic")
        keys = [(r["sensor_id"], r["sample_index"]) for r in rows]
        assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} samples doubled in the transformed topic"
        assert set(keys) == expected
        assert len({r["session_id"] for r in rows}) == SENSORS, "one session per sensor"

        # The processors lived through the failover (restarting from the changelog is allowed)
        # and all three share the partitions while the node is still down. Known failure: a
        # processor whose log ends at a SESSTMOUT is blocked in librdkafka's
        # send_offsets_to_transaction, which ignores its timeout when the group coordinator it
        # cached is dead (librdkafka issues 5456 and 5511; 2.12.1 is bundled here).
        for p in processors:
            assert p.proc.poll() is None, f"processor {p.data_dir} exited with {p.proc.returncode}"

        def all_own_partitions():
            owned = [metric(p.get("/metrics").text, "sensorflow_processor_partitions") for p in processors]
            return owned if all(owned) and sum(owned) == 6 else None

        wait_until(all_own_partitions, timeout=90, interval=0.5, message=f"all 3 processors owning partitions with node {victim} down")
        assert cluster.broker(victim).proc.poll() is not None
        for p in processors:
            m = p.get("/metrics").text
            print(f"{p.data_dir.name}: commits {metric(m, 'sensorflow_processor_commits_total'):.0f}, aborts {metric(m, 'sensorflow_processor_aborts_total'):.0f}, "
                  f"restarts {metric(m, 'sensorflow_processor_restarts_total'):.0f}")

        # The node comes back, catches up and is in sync again on every partition.
        cluster.broker(victim).start()
        wait_until(lambda: fully_replicated(cluster, topics), timeout=60, interval=1, message=f"node {victim} back in every ISR")

        # A clean stop commits everything: still every sample exactly once in the transformed
        # topic (no transaction left open that commits a duplicate later), and in the lake.
        for p in processors:
            assert p.stop() == 0
        final = [(r["sensor_id"], r["sample_index"]) for r in sample_rows(cluster.bootstrap, f"transformed-{uid}")]
        assert len(final) == len(set(final)), f"{len(final) - len(set(final))} samples doubled in the transformed topic"
        assert set(final) == expected
        check_lake_exactly_once(lake, acked, SAMPLES)
        print(f"test body took {time.monotonic() - t_start:.1f} s")
    except BaseException:
        for p in processors + ([gateway] if gateway else []):
            print(p.log_tail())
        print(cluster.log_tails())
        raise
    finally:
        if pub is not None:
            pub.close()
        for p in processors:
            p.stop()
        if gateway is not None:
            gateway.stop()
        cluster.stop()
