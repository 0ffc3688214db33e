"""Model lifecycle (DESIGN "Model contract"): models load from a local HTTP server and from the
S3-compatible test server, every sample row carries the `model_version` that scored it, a new
version is swapped in with `POST /model` while a real MQTT client publishes (no sample lost or
doubled, the old version before the swap and the new one after), a truncated model is refused
with 422 while the old one keeps running, and the swapped-in model survives kill -9."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from testkit import (
    PERIOD_US,
    ROOT,
    Platform,
    Publisher,
    check_lake_exactly_once,
    encode_packet,
    metric,
    synthetic_samples,
    wait_until,
)

DEMO_ONNX = ROOT / "models" / "demo_lstm.onnx"
DEMO_SIDECAR = ROOT / "models" / "demo_lstm.json"
DEMO_VERSION = hashlib.sha256(DEMO_ONNX.read_bytes()).hexdigest()[:12]


def write_model(directory: Path, name: str, version: str | None = None, threshold: float | None = None) -> Path:
    """The demo model under `name` with a sidecar naming `version` (none: the SHA-derived one)."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx = directory / f"{name}.onnx"
    shutil.copyfile(DEMO_ONNX, onnx)
    sidecar = json.loads(DEMO_SIDECAR.read_text())
    if version is not None:
        sidecar["version"] = version
    if threshold is not None:
        sidecar["movement_threshold"] = threshold
    (directory / f"{name}.json").write_text(json.dumps(sidecar))
    return onnx


class FileServer:
    """A plain HTTP server on a loopback port serving one directory (as a model registry or a
    web server would), in a background thread."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def lake_versions(lake: Path) -> list[dict]:
    return pq.read_table(str(lake / "samples"), columns=["sensor_id", "sample_index", "model_version", "ingest_us"]).to_pylist()


def test_models_load_from_http_and_s3_are_cached_and_reloaded_on_sighup(tmp_path, s3_server):
    served = tmp_path / "served"
    write_model(served, "velocity")
    web = FileServer(served)
    url = f"{web.url}/velocity.onnx"
    data = tmp_path / "data-http"
    p = Platform(data, extra_args=["--model", url])
    try:
        model = p.get("/model").json()
        assert model["version"] == DEMO_VERSION, model
        assert model["location"] == url
        assert model["sidecar"]["feature_cols"] == ["accl_mag", "gyro_mag"]
        # A new version uploaded to the same URL; SIGHUP fetches the configured location again.
        write_model(served, "velocity", version="retrained-7")
        p.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: p.get("/model").json()["version"] == "retrained-7", timeout=60, message="SIGHUP reload")
        assert metric(p.get("/metrics").text, "sensorflow_model_swaps_total") == 1
    finally:
        assert p.stop() == 0
    # Without network the restart runs the cached copy of the model it ran.
    web.stop()
    p = Platform(data, extra_args=["--model", url])
    try:
        assert p.get("/model").json()["version"] == "retrained-7"
    finally:
        assert p.stop() == 0

    bucket = s3_server.new_bucket("models")
    local = write_model(tmp_path / "s3src", "m", version="s3-v3")
    s3 = s3_server.client()
    s3.upload_file(str(local), bucket, "velocity/m.onnx")
    s3.upload_file(str(local.with_suffix(".json")), bucket, "velocity/m.json")
    location = f"s3://{bucket}/velocity/m.onnx"
    p = Platform(tmp_path / "data-s3", extra_args=["--model", location], env=s3_server.env)
    try:
        model = p.get("/model").json()
        assert (model["version"], model["location"]) == ("s3-v3", location), model
        # The samples it scores carry that version.
        t0 = int(time.time() * 1e6)
        pub = Publisher(p.mqtt_host, p.mqtt_port)
        for k in range(3):
            pub.publish("s3dev", ("s3dev", 64 * k), encode_packet(64 * k, t0 + k * 64 * PERIOD_US, synthetic_samples(64, k)))
        pub.wait_all_acked(timeout=60)
        pub.close()
    finally:
        assert p.stop() == 0
    rows = lake_versions(tmp_path / "data-s3" / "lake")
    assert len(rows) == 3 * 64 and {r["model_version"] for r in rows} == {"s3-v3"}

    # A location that does not exist fails the start with a clear error.
    with pytest.raises(RuntimeError, match="nope.onnx"):
        Platform(tmp_path / "data-missing", extra_args=["--model", f"s3://{bucket}/nope.onnx"], env=s3_server.env)


SENSORS = ["swap-a", "swap-b", "swap-c"]


class BackgroundPublisher:
    """Publishes one 64-sample packet per sensor every 20 ms from a thread until stopped."""

    def __init__(self, pub: Publisher, t0: int, first_packet: int):
        self.pub, self.t0, self.k = pub, t0, first_packet
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag.is_set():
            self.publish_round()
            time.sleep(0.02)

    def publish_round(self):
        k = self.k
        for i, sid in enumerate(SENSORS):
            base = 64 * k
            self.pub.publish(sid, (sid, base), encode_packet(base, self.t0 + k * 64 * PERIOD_US, synthetic_samples(64, 31 * i + k)))
        self.k += 1

    def stop(self) -> int:
        self.stop_flag.set()
        self.thread.join(timeout=30)
        return self.k


def test_swapping_the_model_while_publishing_loses_nothing_stamps_versions_and_survives_kill_9(tmp_path):
    models = tmp_path / "models"
    candidate = write_model(models, "candidate", version="candidate-2", threshold=0.4)
    truncated = models / "truncated.onnx"
    truncated.write_bytes(DEMO_ONNX.read_bytes()[: DEMO_ONNX.stat().st_size // 2])
    shutil.copyfile(DEMO_SIDECAR, models / "truncated.json")
    data = tmp_path / "data"
    p = Platform(data, env={"SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "30"})
    t0 = int(time.time() * 1e6)
    pub = Publisher(p.mqtt_host, p.mqtt_port)
    feeder = BackgroundPublisher(pub, t0, 0)
    try:
        model = p.get("/model").json()
        assert (model["version"], model["location"]) == (DEMO_VERSION, None), model
        # Phase 1: everything published so far is processed by the old model.
        wait_until(lambda: feeder.k >= 20, timeout=60, message="20 rounds published")
        before_k = feeder.stop()
        pub.wait_all_acked(timeout=60)
        wait_until(
            # A sensor not yet in the status snapshot (refreshed twice a second) answers 404.
            lambda: all(p.get(f"/sensors/{sid}").json().get("samples_decoded") == 64 * before_k for sid in SENSORS),
            timeout=60,
            message="phase 1 processed",
        )
        # Phase 2: swap while the client keeps publishing.
        feeder = BackgroundPublisher(pub, t0, before_k)
        wait_until(lambda: feeder.k >= before_k + 10, timeout=60, message="publishing resumed")
        r = requests.post(p.http + "/model", json={"location": str(candidate)}, timeout=120)
        swapped_at_us = int(time.time() * 1e6)
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["location"]) == ("candidate-2", str(candidate))
        assert r.json()["sidecar"]["movement_threshold"] == 0.4
        # A truncated ONNX file is refused with the reason; the new model keeps running.
        bad = requests.post(p.http + "/model", json={"location": str(truncated)}, timeout=120)
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"]["code"] == "unprocessable" and "onnx" in bad.json()["error"]["message"].lower()
        missing = requests.post(p.http + "/model", json={"location": str(models / "absent.onnx")}, timeout=60)
        assert missing.status_code == 422, missing.text
        assert requests.post(p.http + "/model", json={"where": "x"}, timeout=10).status_code == 400
        assert p.get("/model").json()["version"] == "candidate-2"
        wait_until(lambda: feeder.k >= before_k + 30, timeout=60, message="publishing after the swap")
        after_k = feeder.stop()
        pub.wait_all_acked(timeout=60)
        text = p.get("/metrics").text
        assert metric(text, "sensorflow_model_swaps_total") == 1
        assert metric(text, "sensorflow_model_load_failures_total") == 2
        assert 'sensorflow_model_info{version="candidate-2"' in text
        assert metric(text, "sensorflow_model_inference_seconds_total") > 0
        # kill -9 right after: the restart must run the swapped-in model, not the configured one.
        pub.close()
        p.kill()
        p = Platform(data, env={"SENSORFLOW_CHECKPOINT_INTERVAL_SECS": "30"})
        model = p.get("/model").json()
        assert (model["version"], model["location"]) == ("candidate-2", str(candidate)), model
        pub = Publisher(p.mqtt_host, p.mqtt_port)
        feeder = BackgroundPublisher(pub, t0, after_k)
        wait_until(lambda: feeder.k >= after_k + 10, timeout=60, message="publishing after the restart")
        end_k = feeder.stop()
        pub.wait_all_acked(timeout=60)
        pub.close()
    finally:
        feeder.stop()
        assert p.stop() == 0
    lake = data / "lake"
    check_lake_exactly_once(lake, [(sid, 64 * k) for sid in SENSORS for k in range(end_k)])
    rows = lake_versions(lake)
    assert len(rows) == len(SENSORS) * 64 * end_k
    for sid in SENSORS:
        versions = [r["model_version"] for r in sorted((r for r in rows if r["sensor_id"] == sid), key=lambda r: r["sample_index"])]
        # One switch, old → new, at one point of the sensor's stream.
        switch = versions.index("candidate-2")
        assert set(versions[:switch]) == {DEMO_VERSION} and set(versions[switch:]) == {"candidate-2"}, sid
        assert switch >= 64 * before_k, f"{sid}: a sample processed before the swap was requested carries the new version"
    late = [r for r in rows if r["ingest_us"] > swapped_at_us and r["model_version"] != "candidate-2"]
    assert not late, f"{len(late)} samples received after the swap answered carry the old version"
