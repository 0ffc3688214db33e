"""Cross-check: sensorflow's Rust inference (tract, via the `infer_json` example) against
onnxruntime on the same committed ONNX files, with recurrent state carried over consecutive
calls and several sequences batched per call.

Needs numpy, onnxruntime and pytest, and cargo on PATH (or SENSORFLOW_INFER_JSON pointing at a
built `infer_json` example binary).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_ONNX = REPO / "models" / "demo_lstm.onnx"
STATELESS_ONNX = REPO / "crates" / "model" / "tests" / "fixtures" / "stateless_lstm.onnx"
TOLERANCE = 1e-4


def realistic_features(rng: np.random.Generator, sidecar: dict, batch: int, steps: int, offset: int) -> np.ndarray:
    """Scaled [batch, T, 2] features of sensors at rest or moving at random speeds (200 Hz)."""
    t = (offset + np.arange(steps)) / 200.0
    rows = []
    for _ in range(batch):
        speed = rng.choice([0.0, rng.uniform(0.8, 3.5)])
        phase = 2 * np.pi * (1.4 + 0.5 * speed) * t + rng.uniform(0, 2 * np.pi)
        accl = 1.0 + 0.3 * speed * np.abs(np.sin(phase)) + rng.normal(0, 0.02, steps)
        gyro = np.abs(0.7 * speed * np.sin(phase + 1.0)) + np.abs(rng.normal(0, 0.015, steps))
        rows.append(np.stack([accl, gyro], axis=1))
    raw = np.stack(rows)
    mean = np.array([sidecar["scaler"]["mean"][c] for c in sidecar["feature_cols"]])
    std = np.array([sidecar["scaler"]["std"][c] for c in sidecar["feature_cols"]])
    return ((raw - mean) / std).astype(np.float32)


def run_rust(model: Path, calls: list[dict], tmp_path: Path) -> list[dict]:
    request = tmp_path / "in.json"
    request.write_text(json.dumps({"calls": calls}))
    binary = os.environ.get("SENSORFLOW_INFER_JSON")
    if binary:
        cmd = [binary]
    else:
        if shutil.which("cargo") is None:
            pytest.skip("cargo not on PATH and SENSORFLOW_INFER_JSON not set")
        cmd = ["cargo", "run", "-q", "-p", "sensorflow-model", "--example", "infer_json", "--"]
    out = subprocess.run(
        cmd + ["--model", str(model), str(request)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, f"infer_json failed:\n{out.stderr}"
    return json.loads(out.stdout)["calls"]


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.abs(a - b).max())


def test_stateful_demo_matches_onnxruntime_over_three_calls_with_carried_state(tmp_path):
    sidecar = json.loads(DEMO_ONNX.with_suffix(".json").read_text())
    spec = sidecar["state"]
    stacks, hidden = spec["layers"] * spec["directions"], spec["hidden"]
    rng = np.random.default_rng(20240611)
    batch = 4
    # Calls 1 and 2 are rectangular; in call 3 one sequence is longer, so Rust splits the
    # batch by length while onnxruntime runs each sequence alone.
    lengths = [[64] * batch, [64] * batch, [37, 37, 50, 37]]
    h0 = rng.uniform(-0.5, 0.5, (stacks, batch, hidden)).astype(np.float32)
    c0 = rng.uniform(-1.0, 1.0, (stacks, batch, hidden)).astype(np.float32)
    features = []
    for n, lens in enumerate(lengths):
        full = realistic_features(rng, sidecar, batch, max(lens), offset=64 * n)
        features.append([full[b, : lens[b]] for b in range(batch)])
    calls = [{"features": [f.tolist() for f in fs]} for fs in features]
    calls[0]["h0"], calls[0]["c0"] = h0.tolist(), c0.tolist()

    rust = run_rust(DEMO_ONNX, calls, tmp_path)
    assert len(rust) == 3

    sess = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
    h, c = h0, c0
    for n, (fs, out) in enumerate(zip(features, rust)):
        h_next, c_next = np.empty_like(h), np.empty_like(c)
        for b in range(batch):
            vel, prob, hn, cn = sess.run(
                None, {"sequence_features": fs[b][None], "h_0": h[:, b : b + 1], "c_0": c[:, b : b + 1]}
            )
            assert max_diff(out["velocity_pred"][b], vel[0]) <= TOLERANCE, f"call {n} item {b} velocity"
            assert max_diff(out["movement_prob"][b], prob[0]) <= TOLERANCE, f"call {n} item {b} movement"
            h_next[:, b], c_next[:, b] = hn[:, 0], cn[:, 0]
        assert max_diff(out["h_n"], h_next) <= TOLERANCE, f"call {n} h_n"
        assert max_diff(out["c_n"], c_next) <= TOLERANCE, f"call {n} c_n"
        h, c = h_next, c_next

    # Batched onnxruntime gives the same as its per-sequence runs on the rectangular first call:
    # the comparison above is not hiding a batching difference on the reference side.
    vel, _, _, _ = sess.run(None, {"sequence_features": np.stack(features[0]), "h_0": h0, "c_0": c0})
    assert max_diff(rust[0]["velocity_pred"], vel) <= TOLERANCE
    # And the model reacts to its inputs: not a constant output that would match trivially.
    assert np.std(np.asarray(rust[1]["velocity_pred"])) > 0.01


def test_stateless_model_matches_onnxruntime(tmp_path):
    sidecar = json.loads(STATELESS_ONNX.with_suffix(".json").read_text())
    rng = np.random.default_rng(7)
    feats = realistic_features(rng, sidecar, 3, 48, offset=0)
    rust = run_rust(STATELESS_ONNX, [{"features": feats.tolist()}], tmp_path)
    sess = ort.InferenceSession(str(STATELESS_ONNX), providers=["CPUExecutionProvider"])
    vel, prob = sess.run(None, {"sequence_features": feats})
    assert max_diff(rust[0]["velocity_pred"], vel) <= TOLERANCE
    assert max_diff(rust[0]["movement_prob"], prob) <= TOLERANCE
    assert rust[0]["h_n"] == []
