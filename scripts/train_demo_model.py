#!/usr/bin/env python3
"""Train sensorflow's bundled demo model on synthetic IMU motion and export it to ONNX.

Writes, relative to the repository root:
  models/demo_lstm.onnx                              the model (DESIGN.md "Model contract")
  models/demo_lstm.json                              its sidecar (feature columns, scaler, state, threshold)
  crates/model/tests/fixtures/stateless_lstm.onnx    the same weights without h_0/c_0 (stateless test fixture)
  crates/model/tests/fixtures/stateless_lstm.json

Run once by a developer (CI never retrains; it uses the committed files):
  python3.11 -m venv /work/venv-train
  /work/venv-train/bin/pip install -r tests/python/requirements-train.txt
  /work/venv-train/bin/python scripts/train_demo_model.py            # ~3-5 min on 2 cores
  /work/venv-train/bin/python scripts/train_demo_model.py --export-only   # re-export committed weights

Why JAX and a hand-built ONNX graph rather than PyTorch
-------------------------------------------------------
PyPI's torch wheel for Linux pulls the whole CUDA 13 stack (cudnn, cublas, nccl, cusparselt, triton, ...),
several GB, for a model with 13k parameters trained on a CPU. JAX's CPU wheel is ~100 MB. Writing the ONNX
graph ourselves with `onnx.helper` also gives exact control of what the Rust side (tract-onnx 0.23) has to
run: one standard ONNX `LSTM` op per layer (opset 17, layout 0), a few Transpose/Slice/Squeeze/Concat ops and a
linear head -- no exporter-specific decompositions. The JAX LSTM below implements the ONNX LSTM equations
exactly (gate order i, o, f, c; W and R stored as ONNX lays them out), so the trained weights drop straight
into the graph; the script checks JAX against onnxruntime on the exported file.

Synthetic motion (the Rust simulator implements the same generator; keep both in step)
-------------------------------------------------------------------------------------
 - 200 Hz. Each sensor alternates rest segments and motion segments. The first segment is rest or motion
   with equal probability. Rest lasts U(3, 10) s, motion U(5, 20) s (drawn in seconds, rounded to whole
   samples); each motion segment has its own speed v ~ U(0.8, 3.5) m/s.
 - rest: acc = (0, 0, 1) g + N(0, 0.01) per axis; gyro = N(0, 0.5) deg/s per axis.
 - motion at speed v, with t = seconds since the start of the segment:
       step frequency f = 1.4 + 0.5 v Hz, phase phi(t) = 2 pi f t
       acc_x = 0.30 v sin(phi)            acc_y = 0.15 v sin(phi / 2)     acc_z = 1 + 0.25 v sin(phi + 0.5)   (g)
       gyro_x = 40 v sin(phi + 1.0)       gyro_y = 25 v sin(phi / 2)      gyro_z = 10 v sin(phi)             (deg/s)
   plus N(0, 0.02) g per acc axis and N(0, 1.0) deg/s per gyro axis.
 - targets: velocity = v in motion, 0 at rest; movement = 1 in motion, 0 at rest. Both targets ramp linearly
   over the first and last 0.5 s of a motion segment (the signal itself is not ramped).
 - before features are computed, samples are quantised as the binary packet format does (acc LSB 0.488 mg,
   gyro LSB 0.14 deg/s), so the model is trained on exactly what the pipeline decodes.
Features: accl_mag = |acc| in g, gyro_mag = |gyro| in rad/s, standard-scaled with the mean/std of the
training data (written to the sidecar).

Training: stateful truncated BPTT. Batches of long simulated streams start from zero state (as a session does
in the pipeline) and are cut into 256-step chunks; the final (h, c) of one chunk is the initial state of the
next (gradients stop at the chunk boundary), so the model learns to run with state carried across packets.
Loss = MSE(velocity) + BCE(movement). Adam with global-norm gradient clipping.

Evaluation runs the *exported ONNX file* under onnxruntime on fresh streams in 64-sample calls with state
carried (as the pipeline does), prints velocity MAE at rest and in steady motion and movement accuracy, and
exits non-zero if the model misses its quality bar.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- generator constants (mirrored by the Rust simulator) -------------------------------------------
SAMPLE_RATE_HZ = 200.0
REST_SECS = (3.0, 10.0)
MOTION_SECS = (5.0, 20.0)
SPEED_MPS = (0.8, 3.5)
RAMP_SECS = 0.5
REST_ACC_NOISE_G = 0.01
REST_GYRO_NOISE_DPS = 0.5
MOTION_ACC_NOISE_G = 0.02
MOTION_GYRO_NOISE_DPS = 1.0
# Binary packet (type 0x1E) resolution: acc counts x 0.488/1000 -> g, gyro counts x 140/1000 -> deg/s.
ACC_LSB_G = 0.488 / 1000.0
GYRO_LSB_DPS = 140.0 / 1000.0

# --- model contract ---------------------------------------------------------------------------------
FEATURE_COLS = ["accl_mag", "gyro_mag"]
LAYERS = 2
HIDDEN = 32
MOVEMENT_THRESHOLD = 0.5
OPSET = 17


@dataclass
class Stream:
    """One simulated sensor: raw signals, targets, and where each sample sits in its segment."""

    acc_g: np.ndarray  # [N, 3]
    gyro_dps: np.ndarray  # [N, 3]
    velocity: np.ndarray  # [N] target, m/s
    movement: np.ndarray  # [N] target in [0, 1]
    moving: np.ndarray  # [N] bool, sample lies in a motion segment
    since_start_s: np.ndarray  # [N] seconds since its segment started
    speed: np.ndarray  # [N] segment speed (0 at rest)


def simulate_sensor(rng: np.random.Generator, n_samples: int) -> Stream:
    """Generate one sensor's stream of `n_samples` samples (formulas in the module docstring)."""
    acc = np.empty((n_samples, 3))
    gyro = np.empty((n_samples, 3))
    velocity = np.zeros(n_samples)
    movement = np.zeros(n_samples)
    moving = np.zeros(n_samples, dtype=bool)
    since = np.zeros(n_samples)
    speed = np.zeros(n_samples)
    ramp_n = RAMP_SECS * SAMPLE_RATE_HZ

    pos = 0
    in_motion = bool(rng.integers(0, 2))
    while pos < n_samples:
        lo, hi = MOTION_SECS if in_motion else REST_SECS
        seg_len = int(round(rng.uniform(lo, hi) * SAMPLE_RATE_HZ))
        end = min(pos + seg_len, n_samples)
        n = end - pos
        k = np.arange(n)
        t = k / SAMPLE_RATE_HZ
        since[pos:end] = t
        if in_motion:
            v = rng.uniform(*SPEED_MPS)
            f = 1.4 + 0.5 * v
            phi = 2.0 * math.pi * f * t
            acc[pos:end, 0] = 0.30 * v * np.sin(phi)
            acc[pos:end, 1] = 0.15 * v * np.sin(phi / 2.0)
            acc[pos:end, 2] = 1.0 + 0.25 * v * np.sin(phi + 0.5)
            acc[pos:end] += rng.normal(0.0, MOTION_ACC_NOISE_G, (n, 3))
            gyro[pos:end, 0] = 40.0 * v * np.sin(phi + 1.0)
            gyro[pos:end, 1] = 25.0 * v * np.sin(phi / 2.0)
            gyro[pos:end, 2] = 10.0 * v * np.sin(phi)
            gyro[pos:end] += rng.normal(0.0, MOTION_GYRO_NOISE_DPS, (n, 3))
            # Linear ramp over the first and last RAMP_SECS of the *whole* segment (even if the stream cuts it).
            ramp = np.clip(np.minimum(k / ramp_n, (seg_len - 1 - k) / ramp_n), 0.0, 1.0)
            velocity[pos:end] = v * ramp
            movement[pos:end] = ramp
            moving[pos:end] = True
            speed[pos:end] = v
        else:
            acc[pos:end] = np.array([0.0, 0.0, 1.0]) + rng.normal(0.0, REST_ACC_NOISE_G, (n, 3))
            gyro[pos:end] = rng.normal(0.0, REST_GYRO_NOISE_DPS, (n, 3))
        pos = end
        in_motion = not in_motion
    return Stream(acc, gyro, velocity, movement, moving, since, speed)


def quantize_like_wire(acc_g: np.ndarray, gyro_dps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round to the binary packet's i16 resolution, as a device encoding these samples would."""
    acc = np.clip(np.round(acc_g / ACC_LSB_G), -32768, 32767) * ACC_LSB_G
    gyro = np.clip(np.round(gyro_dps / GYRO_LSB_DPS), -32768, 32767) * GYRO_LSB_DPS
    return acc, gyro


def raw_features(s: Stream) -> np.ndarray:
    """Unscaled model features [N, 2]: accl_mag (g) and gyro_mag (rad/s), as the pipeline computes them."""
    acc, gyro = quantize_like_wire(s.acc_g, s.gyro_dps)
    accl_mag = np.linalg.norm(acc, axis=1)
    gyro_mag = np.linalg.norm(np.deg2rad(gyro), axis=1)
    return np.stack([accl_mag, gyro_mag], axis=1)


def simulate_batch(rng: np.random.Generator, n_streams: int, n_samples: int) -> list[Stream]:
    return [simulate_sensor(rng, n_samples) for _ in range(n_streams)]


# --- model (JAX), ONNX LSTM semantics ---------------------------------------------------------------


def init_params(key, n_features: int) -> dict:
    import jax

    params = {}
    bound = 1.0 / math.sqrt(HIDDEN)
    in_size = n_features
    for layer in range(LAYERS):
        key, kw, kr = jax.random.split(key, 3)
        w = jax.random.uniform(kw, (4 * HIDDEN, in_size), minval=-bound, maxval=bound)
        r = jax.random.uniform(kr, (4 * HIDDEN, HIDDEN), minval=-bound, maxval=bound)
        # ONNX gate order is i, o, f, c: a forget-gate bias of +1 helps the cell keep state early in training.
        b = np.zeros(4 * HIDDEN, dtype=np.float32)
        b[2 * HIDDEN : 3 * HIDDEN] = 1.0
        params[f"lstm{layer}"] = {"W": w, "R": r, "b": jax.numpy.asarray(b)}
        in_size = HIDDEN
    key, kh = jax.random.split(key)
    params["head"] = {
        "W": jax.random.uniform(kh, (HIDDEN, 2), minval=-bound, maxval=bound),
        "b": jax.numpy.zeros(2),
    }
    return params


def forward(params: dict, x, h0, c0):
    """x [T, B, F] (time-major, like ONNX layout 0); h0, c0 [LAYERS, B, H].

    Returns (velocity [T, B], movement_logit [T, B], h_n, c_n).
    """
    import jax
    import jax.numpy as jnp

    def sigmoid(z):
        return jax.nn.sigmoid(z)

    hs, cs = [], []
    y = x
    for layer in range(LAYERS):
        p = params[f"lstm{layer}"]
        xw = y @ p["W"].T + p["b"]

        def step(carry, xw_t, r=p["R"]):
            h, c = carry
            z = xw_t + h @ r.T
            i, o, f, g = jnp.split(z, 4, axis=-1)
            c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
            h = sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        (h, c), y = jax.lax.scan(step, (h0[layer], c0[layer]), xw)
        hs.append(h)
        cs.append(c)
    head = y @ params["head"]["W"] + params["head"]["b"]
    return head[..., 0], head[..., 1], jnp.stack(hs), jnp.stack(cs)


def train(args, mean: np.ndarray, std: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(args.seed)
    params = init_params(jax.random.PRNGKey(args.seed), len(FEATURE_COLS))

    def loss_fn(params, x, h0, c0, vel_t, mov_t):
        vel, logit, h, c = forward(params, x, h0, c0)
        mse = jnp.mean((vel - vel_t) ** 2)
        # Numerically stable BCE on logits; targets are soft on the ramps.
        bce = jnp.mean(jax.nn.softplus(logit) - mov_t * logit)
        return mse + bce, (h, c, mse, bce)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def train_step(params, m, v, step, lr, x, h0, c0, vel_t, mov_t):
        (loss, (h, c, mse, bce)), grads = grad_fn(params, x, h0, c0, vel_t, mov_t)
        leaves = jax.tree_util.tree_leaves(grads)
        gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in leaves))
        scale = jnp.minimum(1.0, args.clip / (gnorm + 1e-12))
        grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
        m = jax.tree_util.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        mhat_c = 1.0 / (1 - b1**step)
        vhat_c = 1.0 / (1 - b2**step)
        params = jax.tree_util.tree_map(
            lambda p, m_, v_: p - lr * (m_ * mhat_c) / (jnp.sqrt(v_ * vhat_c) + eps), params, m, v
        )
        return params, m, v, jax.lax.stop_gradient(h), jax.lax.stop_gradient(c), mse, bce

    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    stream_len = args.chunks_per_stream * args.chunk
    total_steps = args.rounds * args.chunks_per_stream
    step = 0
    t0 = time.time()
    for rnd in range(args.rounds):
        streams = simulate_batch(rng, args.batch, stream_len)
        feats = np.stack([(raw_features(s) - mean) / std for s in streams], axis=1).astype(np.float32)  # [N,B,F]
        vel_t = np.stack([s.velocity for s in streams], axis=1).astype(np.float32)
        mov_t = np.stack([s.movement for s in streams], axis=1).astype(np.float32)
        # Every stream starts from zero state, like a session in the pipeline; state then carries over chunks.
        h = jnp.zeros((LAYERS, args.batch, HIDDEN))
        c = jnp.zeros((LAYERS, args.batch, HIDDEN))
        mses, bces = [], []
        for k in range(args.chunks_per_stream):
            step += 1
            frac = step / total_steps
            lr = args.lr if frac < 0.5 else args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (frac - 0.5) / 0.5)))
            sl = slice(k * args.chunk, (k + 1) * args.chunk)
            params, m, v, h, c, mse, bce = train_step(
                params, m, v, float(step), lr, feats[sl], h, c, vel_t[sl], mov_t[sl]
            )
            mses.append(float(mse))
            bces.append(float(bce))
        print(
            f"round {rnd + 1:3d}/{args.rounds}  mse(velocity) {np.mean(mses):.4f}  bce(movement) {np.mean(bces):.4f}"
            f"  lr {lr:.2e}  {time.time() - t0:6.1f}s",
            flush=True,
        )
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), params)


# --- ONNX export ------------------------------------------------------------------------------------


def build_onnx(params: dict, stateful: bool):
    """Build the contract graph: sequence_features [batch, T, F] (+ h_0, c_0 [L, batch, H]) ->
    velocity_pred [batch, T], movement_prob [batch, T] (+ h_n, c_n [L, batch, H])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    nf = len(FEATURE_COLS)
    inits = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    inputs = [helper.make_tensor_value_info("sequence_features", f32, ["batch", "T", nf])]
    outputs = [
        helper.make_tensor_value_info("velocity_pred", f32, ["batch", "T"]),
        helper.make_tensor_value_info("movement_prob", f32, ["batch", "T"]),
    ]
    if stateful:
        for name in ("h_0", "c_0"):
            inputs.append(helper.make_tensor_value_info(name, f32, [LAYERS, "batch", HIDDEN]))
        for name in ("h_n", "c_n"):
            outputs.append(helper.make_tensor_value_info(name, f32, [LAYERS, "batch", HIDDEN]))

    nodes = [helper.make_node("Transpose", ["sequence_features"], ["x_tbf"], perm=[1, 0, 2], name="to_time_major")]
    const("axis1", np.array([1], dtype=np.int64))
    y = "x_tbf"
    layer_h, layer_c = [], []
    for layer in range(LAYERS):
        p = params[f"lstm{layer}"]
        w = const(f"lstm{layer}.W", p["W"][None].astype(np.float32))
        r = const(f"lstm{layer}.R", p["R"][None].astype(np.float32))
        # ONNX B is [Wb | Rb]; training uses one bias per gate, so Rb is zero.
        b = const(f"lstm{layer}.B", np.concatenate([p["b"], np.zeros_like(p["b"])])[None].astype(np.float32))
        lstm_inputs = [y, w, r, b]
        if stateful:
            starts = const(f"l{layer}.start", np.array([layer], dtype=np.int64))
            ends = const(f"l{layer}.end", np.array([layer + 1], dtype=np.int64))
            axis0 = const(f"l{layer}.axis", np.array([0], dtype=np.int64))
            for name in ("h", "c"):
                nodes.append(
                    helper.make_node(
                        "Slice", [f"{name}_0", starts, ends, axis0], [f"{name}0_l{layer}"], name=f"{name}0_l{layer}"
                    )
                )
            lstm_inputs += ["", f"h0_l{layer}", f"c0_l{layer}"]
        nodes.append(
            helper.make_node(
                "LSTM",
                lstm_inputs,
                [f"y_l{layer}", f"hn_l{layer}", f"cn_l{layer}"],
                hidden_size=HIDDEN,
                direction="forward",
                name=f"lstm{layer}",
            )
        )
        # Y is [T, num_directions=1, batch, H]: drop the direction axis for the next layer.
        nodes.append(helper.make_node("Squeeze", [f"y_l{layer}", "axis1"], [f"y_l{layer}_s"], name=f"squeeze{layer}"))
        y = f"y_l{layer}_s"
        layer_h.append(f"hn_l{layer}")
        layer_c.append(f"cn_l{layer}")
    if stateful:
        nodes.append(helper.make_node("Concat", layer_h, ["h_n"], axis=0, name="h_n"))
        nodes.append(helper.make_node("Concat", layer_c, ["c_n"], axis=0, name="c_n"))

    nodes.append(helper.make_node("Transpose", [y], ["y_btf"], perm=[1, 0, 2], name="to_batch_major"))
    const("head.W", params["head"]["W"].astype(np.float32))
    const("head.b", params["head"]["b"].astype(np.float32))
    nodes.append(helper.make_node("MatMul", ["y_btf", "head.W"], ["head_mm"], name="head_matmul"))
    nodes.append(helper.make_node("Add", ["head_mm", "head.b"], ["head_out"], name="head_bias"))
    const("idx0", np.array(0, dtype=np.int64))
    const("idx1", np.array(1, dtype=np.int64))
    nodes.append(helper.make_node("Gather", ["head_out", "idx0"], ["velocity_pred"], axis=2, name="velocity"))
    nodes.append(helper.make_node("Gather", ["head_out", "idx1"], ["movement_logit"], axis=2, name="movement_logit"))
    nodes.append(helper.make_node("Sigmoid", ["movement_logit"], ["movement_prob"], name="movement_prob"))

    graph = helper.make_graph(nodes, "sensorflow_demo_lstm", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="sensorflow/scripts/train_demo_model.py",
        doc_string="sensorflow demo model: 2-layer LSTM(32) on scaled accl_mag/gyro_mag -> velocity, movement.",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def params_from_onnx(path: Path) -> dict:
    """Read trained weights back from an exported model (for --export-only)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    params = {}
    for layer in range(LAYERS):
        params[f"lstm{layer}"] = {
            "W": inits[f"lstm{layer}.W"][0],
            "R": inits[f"lstm{layer}.R"][0],
            "b": inits[f"lstm{layer}.B"][0][: 4 * HIDDEN],
        }
    params["head"] = {"W": inits["head.W"], "b": inits["head.b"]}
    return params


def sidecar(mean: np.ndarray, std: np.ndarray, stateful: bool) -> dict:
    doc = {
        "feature_cols": FEATURE_COLS,
        "scaler": {
            "mean": {c: float(np.float32(m)) for c, m in zip(FEATURE_COLS, mean)},
            "std": {c: float(np.float32(s)) for c, s in zip(FEATURE_COLS, std)},
        },
    }
    if stateful:
        doc["state"] = {"layers": LAYERS, "directions": 1, "hidden": HIDDEN}
    doc["movement_threshold"] = MOVEMENT_THRESHOLD
    return doc


# --- evaluation -------------------------------------------------------------------------------------


def evaluate(onnx_path: Path, mean: np.ndarray, std: np.ndarray, params: dict | None, seed: int) -> bool:
    """Run the exported model under onnxruntime like the pipeline does; print metrics; return pass/fail."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    n_streams, n_samples, call_t = 16, int(180 * SAMPLE_RATE_HZ), 64
    streams = simulate_batch(rng, n_streams, n_samples)
    x = np.stack([(raw_features(s) - mean) / std for s in streams]).astype(np.float32)  # [B, N, F]
    h = np.zeros((LAYERS, n_streams, HIDDEN), np.float32)
    c = np.zeros_like(h)
    vel = np.empty((n_streams, n_samples), np.float32)
    prob = np.empty_like(vel)
    for start in range(0, n_samples, call_t):
        sl = slice(start, min(start + call_t, n_samples))
        vel[:, sl], prob[:, sl], h, c = sess.run(None, {"sequence_features": x[:, sl], "h_0": h, "c_0": c})

    if params is not None:
        # The JAX forward pass (training semantics) must match onnxruntime on the exported graph.
        import jax.numpy as jnp

        n = 2048
        zeros = jnp.zeros((LAYERS, n_streams, HIDDEN))
        jv, jl, _, _ = forward(params, jnp.asarray(x[:, :n].transpose(1, 0, 2)), zeros, zeros)
        ov, op, _, _ = sess.run(
            None,
            {"sequence_features": x[:, :n], "h_0": np.asarray(zeros), "c_0": np.asarray(zeros)},
        )
        jp = 1.0 / (1.0 + np.exp(-np.asarray(jl).T))
        diff = max(np.abs(np.asarray(jv).T - ov).max(), np.abs(jp - op).max())
        print(f"JAX vs onnxruntime max abs diff over {n} steps: {diff:.2e}")
        if diff > 1e-3:
            print("FAIL: exported graph disagrees with the trained model", file=sys.stderr)
            return False

    moving = np.stack([s.moving for s in streams])
    since = np.stack([s.since_start_s for s in streams])
    speed = np.stack([s.speed for s in streams])
    vel_t = np.stack([s.velocity for s in streams])
    mov_t = np.stack([s.movement for s in streams])
    # "Steady": the model gets 1.5 s after a transition to settle, and motion excludes the final ramp.
    rest = ~moving & (since >= 1.5)
    steady = moving & (since >= 1.5) & (vel_t >= speed - 1e-9)
    mae_rest = np.abs(vel[rest]).mean()
    mae_motion = np.abs(vel[steady] - speed[steady]).mean()
    acc_all = ((prob >= MOVEMENT_THRESHOLD) == (mov_t >= 0.5)).mean()
    rest_ok = ((np.abs(vel) < 0.2) & (prob < 0.2))[rest].mean()
    motion_ok = ((np.abs(vel - speed) < 0.5) & (prob > 0.8))[steady].mean()
    print(f"evaluation: {n_streams} sensors x {n_samples / SAMPLE_RATE_HZ:.0f} s, {call_t}-sample calls, state carried")
    print(f"  velocity MAE at rest (steady)     {mae_rest:.3f} m/s   over {rest.sum()} samples")
    print(f"  velocity MAE in motion (steady)   {mae_motion:.3f} m/s   over {steady.sum()} samples")
    print(f"  movement accuracy (all samples)   {acc_all:.4f}")
    print(f"  rest samples with |v|<0.2 and p<0.2          {rest_ok:.4f}")
    print(f"  motion samples with |v-v*|<0.5 and p>0.8     {motion_ok:.4f}")
    for lo, hi in [(0.8, 1.5), (1.5, 2.5), (2.5, 3.5)]:
        sel = steady & (speed >= lo) & (speed < hi)
        if sel.any():
            print(f"    speed {lo:.1f}-{hi:.1f} m/s: mean prediction {vel[sel].mean():.2f}, target {speed[sel].mean():.2f}")
    ok = mae_rest < 0.1 and mae_motion < 0.3 and rest_ok > 0.97 and motion_ok > 0.9 and acc_all > 0.95
    print("quality bar:", "PASS" if ok else "FAIL")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "models")
    ap.add_argument("--fixture-dir", type=Path, default=REPO_ROOT / "crates/model/tests/fixtures")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=40, help="fresh batches of simulated streams")
    ap.add_argument("--batch", type=int, default=64, help="streams per batch")
    ap.add_argument("--chunk", type=int, default=256, help="truncated-BPTT length in samples")
    ap.add_argument("--chunks-per-stream", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--export-only", action="store_true", help="re-export the committed weights; no training")
    args = ap.parse_args()

    import onnx

    onnx_path = args.out_dir / "demo_lstm.onnx"
    json_path = args.out_dir / "demo_lstm.json"
    if args.export_only:
        params = params_from_onnx(onnx_path)
        side = json.loads(json_path.read_text())
        mean = np.array([side["scaler"]["mean"][c] for c in FEATURE_COLS])
        std = np.array([side["scaler"]["std"][c] for c in FEATURE_COLS])
    else:
        # The scaler comes from a separate draw of the same generator (large enough to be stable).
        scaler_rng = np.random.default_rng(args.seed + 1000)
        feats = np.concatenate([raw_features(s) for s in simulate_batch(scaler_rng, 64, int(120 * SAMPLE_RATE_HZ))])
        mean, std = feats.mean(axis=0), feats.std(axis=0)
        print(f"scaler: mean {mean}, std {std}")
        params = train(args, mean, std)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.fixture_dir.mkdir(parents=True, exist_ok=True)
    for stateful, path, jpath in [
        (True, onnx_path, json_path),
        (False, args.fixture_dir / "stateless_lstm.onnx", args.fixture_dir / "stateless_lstm.json"),
    ]:
        onnx.save(build_onnx(params, stateful), str(path))
        jpath.write_text(json.dumps(sidecar(mean, std, stateful), indent=2) + "\n")
        print(f"wrote {path} and {jpath.name}")

    ok = evaluate(onnx_path, mean, std, None if args.export_only else params, seed=args.seed + 2000)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
