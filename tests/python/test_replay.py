"""`sensorflow replay --from T --lake DIR` reprocesses the retained log into a new lake, while the
platform keeps running on the same data dir."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import time

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from testkit import PERIOD_US, ROOT, Platform, Publisher, binary_path, encode_packet, synthetic_samples

SENSORS = [f"replay-{i}" for i in range(4)]
PACKETS = 10


def publish_phase(pub: Publisher, t0: int, first_packet: int):
    for k in range(first_packet, first_packet + PACKETS):
        for i, sid in enumerate(SENSORS):
            base = 64 * k
            pub.publish(sid, (sid, base), encode_packet(base, t0 + base * PERIOD_US, synthetic_samples(64, i * 100 + k)))
    pub.wait_all_acked(timeout=60)


def replay(data, lake, since: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary_path()), "replay", "--from", since, "--lake", str(lake), "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120,
    )


def samples(lake) -> dict[tuple[str, int], float]:
    table = pq.read_table(str(lake / "samples"), columns=["sensor_id", "sample_index", "velocity_pred"])
    rows = table.to_pylist()
    out = {(r["sensor_id"], r["sample_index"]): r["velocity_pred"] for r in rows}
    assert len(out) == len(rows), "duplicate samples"
    return out


def test_replay_from_a_time_reprocesses_exactly_the_records_received_since(tmp_path):
    data = tmp_path / "data"
    t0 = int(time.time() * 1e6) - 60_000_000
    platform = Platform(data)
    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    try:
        publish_phase(pub, t0, 0)
        # Every phase-1 record was received before its PUBACK, hence before this instant.
        boundary = dt.datetime.now(dt.timezone.utc).isoformat()
        publish_phase(pub, t0, PACKETS)

        # While the platform runs (and holds the log's lock).
        since = replay(data, tmp_path / "since", boundary)
        assert since.returncode == 0, since.stderr
        everything = replay(data, tmp_path / "all", "2000-01-01T00:00:00Z")
        assert everything.returncode == 0, everything.stderr
        refused = replay(data, tmp_path / "all", "2000-01-01T00:00:00Z")
        assert refused.returncode != 0 and "not empty" in refused.stderr
        bad_time = replay(data, tmp_path / "x", "yesterday")
        assert bad_time.returncode != 0 and "RFC 3339" in bad_time.stderr
    finally:
        pub.close()
        assert platform.stop() == 0

    phase2 = {(sid, 64 * k + j) for sid in SENSORS for k in range(PACKETS, 2 * PACKETS) for j in range(64)}
    assert set(samples(tmp_path / "since")) == phase2

    live = samples(data / "lake")
    replayed = samples(tmp_path / "all")
    assert set(replayed) == set(live) and len(live) == 2 * len(phase2)
    # Same model, same order of records per sensor: the same predictions as live.
    for key, v in live.items():
        assert v is not None and abs(replayed[key] - v) <= 1e-5, (key, v, replayed[key])
    sessions = pq.read_table(str(tmp_path / "all" / "sessions")).to_pylist()
    assert {s["sensor_id"] for s in sessions} == set(SENSORS)


def test_shadow_replay_of_a_candidate_from_s3_into_an_s3_lake(tmp_path, s3_server):
    """The shadow workflow of the README: replay the log with a candidate model fetched from S3
    into a lake on S3, every row stamped with the candidate's version."""
    data = tmp_path / "data"
    t0 = int(time.time() * 1e6) - 60_000_000
    platform = Platform(data)
    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    try:
        publish_phase(pub, t0, 0)
    finally:
        pub.close()
        assert platform.stop() == 0

    bucket = s3_server.new_bucket("shadow")
    cand = tmp_path / "candidate.onnx"
    shutil.copyfile(ROOT / "models" / "demo_lstm.onnx", cand)
    sidecar = json.loads((ROOT / "models" / "demo_lstm.json").read_text())
    sidecar["version"] = "shadow-9"
    cand.with_suffix(".json").write_text(json.dumps(sidecar))
    s3 = s3_server.client()
    s3.upload_file(str(cand), bucket, "models/candidate.onnx")
    s3.upload_file(str(cand.with_suffix(".json")), bucket, "models/candidate.json")

    done = subprocess.run(
        [str(binary_path()), "replay", "--from", "2000-01-01T00:00:00Z", "--data-dir", str(data),
         "--lake", f"s3://{bucket}/lake", "--model", f"s3://{bucket}/models/candidate.onnx"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **s3_server.env},
    )
    assert done.returncode == 0, done.stderr
    assert "shadow-9" in done.stderr
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint.removeprefix("http://"), scheme="http",
                           access_key=s3_server.ACCESS_KEY, secret_key=s3_server.SECRET_KEY, region=s3_server.REGION)
    table = ds.dataset(f"{bucket}/lake/samples", filesystem=fs, format="parquet", partitioning="hive").to_table()
    rows = table.select(["sensor_id", "sample_index", "model_version"]).to_pylist()
    assert len(rows) == len(SENSORS) * PACKETS * 64
    assert len({(r["sensor_id"], r["sample_index"]) for r in rows}) == len(rows)
    assert {r["model_version"] for r in rows} == {"shadow-9"}
