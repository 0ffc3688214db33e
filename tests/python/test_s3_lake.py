"""The Parquet lake on an S3-compatible server (moto's server mode, a real HTTP S3 API):
`sensorflow run --lake s3://BUCKET/prefix` with the standard AWS variables.

Same rules as the local lake (DESIGN.md "Output contract", "Distributed mode"): Hive `date=`
partitions, no partial or temporary object ever listed, every acknowledged sample exactly once
after kill -9 and restart (files of epochs after the restored checkpoint are found by listing
the prefix and deleted), and small files of closed partitions merged. The lake is read back
the way a user would: pyarrow's S3 filesystem and `pyarrow.dataset` with Hive partitioning.
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time

import pyarrow.dataset as ds
import pyarrow.fs as pafs

from testkit import PERIOD_US, Platform, Publisher, encode_packet, metric, synthetic_samples, wait_until

SENSORS = 10
PACKETS = 30
PREFIX = "lake"
# Files roll every second, checkpoints every 3 s: kills land after files of an unfinished epoch
# were uploaded, which recovery must delete from the bucket.
ENV = {
    "SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "3",
    "SENSORFLOW_LAKE_MAX_FILE_AGE_SECS": "1",
}
DATA_KEY = re.compile(rf"^{PREFIX}/[a-z_]+/date=\d{{4}}-\d{{2}}-\d{{2}}/part-\d{{13}}-\d{{6}}-[A-Za-z0-9_-]+\.parquet$")


def s3_fs(s3) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=s3.endpoint.removeprefix("http://"),
        scheme="http",
        access_key=s3.ACCESS_KEY,
        secret_key=s3.SECRET_KEY,
        region=s3.REGION,
    )


def keys(s3, bucket: str) -> list[str]:
    out = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def samples(s3, bucket: str) -> list[tuple[str, int]]:
    """(sensor_id, sample_index) of every row of `samples`; none while the table has no file
    (before the first upload, or after a recovery from no checkpoint deleted them all)."""
    try:
        dataset = ds.dataset(f"{bucket}/{PREFIX}/samples", filesystem=s3_fs(s3), format="parquet", partitioning="hive")
    except FileNotFoundError:
        return []
    assert "date" in dataset.schema.names, "no Hive date= partition column"
    table = dataset.to_table(columns=["sensor_id", "sample_index"])
    return list(zip(table.column("sensor_id").to_pylist(), table.column("sample_index").to_pylist()))


def check_s3_lake_exactly_once(s3, bucket: str, acked_packets, samples_per_packet: int = 64):
    all_keys = keys(s3, bucket)
    assert all_keys, "nothing in the bucket"
    strays = [k for k in all_keys if not DATA_KEY.match(k)]
    assert not strays, f"objects that are not committed data files (temp, journal, partial?): {strays[:5]}"
    pairs = samples(s3, bucket)
    assert len(pairs) == len(set(pairs)), f"{len(pairs) - len(set(pairs))} duplicate samples in the S3 lake"
    present = set(pairs)
    missing = [(sid, base + i) for sid, base in acked_packets for i in range(samples_per_packet) if (sid, base + i) not in present]
    assert not missing, f"{len(missing)} acknowledged samples missing from the S3 lake, e.g. {missing[:5]}"


def uncheckpointed_file_uploaded(s3, bucket: str, data) -> bool:
    """Whether the bucket holds a data file of an epoch after the newest checkpoint: a kill now
    leaves recovery something to delete."""
    checkpoints = [int(p.stem) for p in (data / "checkpoints").glob("*.ckpt")]
    newest = max(checkpoints, default=0)
    epochs = [int(m.group(1)) for k in keys(s3, bucket) if (m := re.search(r"-e(\d{10})\.parquet$", k))]
    return any(e > newest for e in epochs)


def test_kill_9_with_the_lake_on_s3_loses_and_doubles_nothing(tmp_path, s3_server):
    bucket = s3_server.new_bucket("lake")
    env = {**ENV, **s3_server.env}
    args = ["--lake", f"s3://{bucket}/{PREFIX}"]
    t0 = int(time.time() * 1e6) - 60_000_000
    packets = {
        f"s3-{s:02d}": [(64 * k, encode_packet(64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, s * 100 + k))) for k in range(PACKETS)]
        for s in range(SENSORS)
    }
    data = tmp_path / "data"
    platform = Platform(data, env=env, extra_args=args)
    mqtt_listen, http_listen = f"127.0.0.1:{platform.mqtt_port}", platform.http.removeprefix("http://")
    rng = random.Random(4321)
    kill_rounds = sorted(rng.sample(range(4, PACKETS - 2), 3))
    removed = []
    try:
        pub = Publisher(platform.mqtt_host, platform.mqtt_port)
        for k in range(PACKETS):
            for sid, plist in packets.items():
                base, payload = plist[k]
                pub.publish(sid, (sid, base), payload)
            if k in kill_rounds:
                # Kill once a file of the unfinished epoch is in the bucket (a checkpoint may still
                # slip in between; one kill of three exercising it is enough).
                wait_until(lambda: uncheckpointed_file_uploaded(s3_server, bucket, data), timeout=20, interval=0.05, message="a file of an unfinished epoch")
                platform.kill()
                platform = Platform(data, env=env, extra_args=args, mqtt_listen=mqtt_listen, http_listen=http_listen)
                removed.append(metric(platform.get("/metrics").text, "sensorflow_recovery_lake_files_removed"))
            time.sleep(0.25)
        pub.wait_all_acked(timeout=180)
        acked = set(pub.acked)
        pub.close()
        assert len(acked) == SENSORS * PACKETS
        # Everything acknowledged reaches the bucket while the platform runs (age roll).
        wait_until(lambda: len(set(samples(s3_server, bucket))) >= SENSORS * PACKETS * 64, timeout=60, message="every sample in the S3 lake")
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    check_s3_lake_exactly_once(s3_server, bucket, acked)
    assert sum(removed) > 0, f"no restart deleted files of an unfinished epoch from the bucket ({removed}): the kills did not exercise recovery"
    # Nothing of the lake is kept locally but staging leftovers, and those are cleaned up.
    assert not (data / "lake").exists()
    assert not [p for p in (data / "lake-staging").rglob("*") if p.is_file()]


def test_small_files_of_a_closed_partition_are_merged_on_s3(tmp_path, s3_server):
    bucket = s3_server.new_bucket("compact")
    env = {"SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "0.3", **s3_server.env}
    packets = 6
    t0 = int((time.time() - 2 * 86400) * 1e6)
    day = dt.datetime.fromtimestamp(t0 / 1e6, dt.timezone.utc).date()
    if dt.datetime.fromtimestamp((t0 + packets * 64 * PERIOD_US) / 1e6, dt.timezone.utc).date() != day:
        t0 += 60_000_000
        day = dt.datetime.fromtimestamp(t0 / 1e6, dt.timezone.utc).date()
    partition = f"{PREFIX}/samples/date={day.isoformat()}/"

    def files():
        return [k for k in keys(s3_server, bucket) if k.startswith(partition)]

    def rows():
        try:
            return len(samples(s3_server, bucket))
        except OSError:  # a file merged away while we read: retry
            return -1

    platform = Platform(tmp_path, env=env, extra_args=["--lake", f"s3://{bucket}/{PREFIX}"])
    try:
        pub = Publisher(platform.mqtt_host, platform.mqtt_port)
        for k in range(packets):
            base = 64 * k
            pub.publish("backlog-s3", ("backlog-s3", base), encode_packet(base, t0 + base * PERIOD_US, synthetic_samples(64, k)))
            pub.wait_all_acked(timeout=30)
            wait_until(lambda: rows() >= base + 64, timeout=30, message=f"packet {k} in the S3 lake")
        pub.close()
        wait_until(lambda: len(files()) == 1 and rows() == packets * 64, timeout=60, message="the S3 partition merged into one object")
        assert metric(platform.get("/metrics").text, "sensorflow_lake_compactions_total") >= 1
        assert sorted(i for _, i in samples(s3_server, bucket)) == list(range(packets * 64))
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    # No hidden output or journal left behind.
    assert [k for k in keys(s3_server, bucket) if not DATA_KEY.match(k)] == []
