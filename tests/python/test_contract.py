"""Contract fixes of issue 15 against the real binary and real clients: `velocity_pred` is
masked below the movement threshold and `velocity_raw` keeps the model's output; ended sessions
keep their aggregate and end reason across a restart; a clean stop ends no session; and the
log on a pipe is plain text without duplicate or noise lines."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow.parquet as pq

from testkit import PERIOD_US, Platform, Publisher, WsCollector, encode_packet, synthetic_samples, wait_until

SAMPLES = 64
PACKET_US = SAMPLES * PERIOD_US


def publish(platform: Platform, sid: str, packets: list[tuple[int, int, bool]]) -> None:
    """Publishes `(sample index base, timestamp_us, moving)` packets of `sid` with QoS 1 and
    waits until the platform acknowledged every one."""
    pub = Publisher(platform.mqtt_host, platform.mqtt_port)
    try:
        for base, ts, moving in packets:
            pub.publish(sid, (sid, base), encode_packet(base, ts, synthetic_samples(SAMPLES, base // SAMPLES, moving=moving)))
        pub.wait_all_acked(timeout=60)
    finally:
        pub.close()


def sessions(platform: Platform, query: str) -> list[dict]:
    r = platform.get("/sessions?" + query)
    assert r.status_code == 200, r.text
    return r.json()


def test_velocity_pred_is_masked_below_the_threshold_and_velocity_raw_is_the_model_output(tmp_path):
    threshold = 0.5
    platform = Platform(tmp_path, env={"SENSORFLOW_PIPELINE_MOVEMENT_THRESHOLD": str(threshold)})
    t0 = int(time.time() * 1e6) - 60_000_000
    try:
        ws = WsCollector(platform.ws + "/ws/raw/mask-1")
        # Alternating stretches of motion and stillness, so the demo model's movement
        # probability crosses the threshold both ways.
        packets = [(k * SAMPLES, t0 + k * PACKET_US, (k // 4) % 2 == 0) for k in range(24)]
        publish(platform, "mask-1", packets)
        rows = wait_until(lambda: len(ws.rows()) >= 24 * SAMPLES and ws.rows(), timeout=30, message="every sample on /ws/raw/mask-1")
        ws.close()
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])

    def check(rows: list[dict], where: str) -> tuple[int, int]:
        below = above = 0
        for r in rows:
            v, raw, p = r["velocity_pred"], r["velocity_raw"], r["movement_prob"]
            assert math.isfinite(raw) and math.isfinite(p), f"{where}: {r}"
            if p < threshold:
                below += 1
                assert v == 0.0, f"{where}: movement_prob {p} < {threshold} but velocity_pred {v}"
            else:
                above += 1
                assert v == raw, f"{where}: movement_prob {p} >= {threshold} but velocity_pred {v} != velocity_raw {raw}"
        return below, above

    table = pq.read_table(str(tmp_path / "lake" / "samples"), columns=["sensor_id", "sample_index", "velocity_pred", "velocity_raw", "movement_prob"])
    lake_rows = table.to_pylist()
    assert len(lake_rows) == 24 * SAMPLES
    below, above = check(lake_rows, "lake")
    probs = sorted(r["movement_prob"] for r in lake_rows)
    assert below > 0 and above > 0, f"probabilities do not straddle {threshold}: {probs[0]}..{probs[-1]}"
    assert any(r["velocity_raw"] != 0.0 for r in lake_rows if r["movement_prob"] < threshold), "nothing was masked"
    # The live feed carries the same two columns, with the same values.
    check(rows, "/ws/raw")
    by_index = {r["sample_index"]: r for r in lake_rows}
    f32 = np.float32  # JSON carries the f32's shortest decimal, pyarrow widens it to f64
    for r in rows:
        lake = by_index[r["sample_index"]]
        assert (f32(r["velocity_pred"]), f32(r["velocity_raw"])) == (f32(lake["velocity_pred"]), f32(lake["velocity_raw"]))


def test_ended_sessions_keep_their_aggregate_and_end_reason_across_a_restart(tmp_path):
    env = {"SENSORFLOW_PIPELINE_SESSION_GAP_SECS": "60"}
    platform = Platform(tmp_path, env=env)
    t0 = int(time.time() * 1e6) - 120_000_000
    try:
        # Six packets, then 90 s of event-time silence: the first session ends by the gap.
        first = [(k * SAMPLES, t0 + k * PACKET_US, True) for k in range(6)]
        second = [((6 + k) * SAMPLES, t0 + 90_000_000 + k * PACKET_US, True) for k in range(3)]
        publish(platform, "restart-1", first + second)
        before = wait_until(
            lambda: [s for s in sessions(platform, "active=false&sensor_id=restart-1") if s["aggregate"] and s["aggregate"]["sample_count"] == 6 * SAMPLES],
            timeout=30,
            message="the first session ended with its final aggregate",
        )
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    assert len(before) == 1
    ended = before[0]
    assert ended["session_id"] == f"restart-1_{t0}"
    assert ended["end_reason"] == "gap"
    assert ended["active"] is False and ended["sample_count"] == 6 * SAMPLES

    platform = Platform(tmp_path, env=env, mqtt_listen="127.0.0.1:0")
    try:
        after = sessions(platform, "active=false&sensor_id=restart-1")
        one = platform.get(f"/sessions/{ended['session_id']}").json()
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    assert [s for s in after if s["session_id"] == ended["session_id"]] == [ended], f"before {before}, after {after}"
    assert one == ended
    assert one["aggregate"] is not None and one["end_reason"] == "gap"


def test_a_clean_stop_ends_no_session_and_the_sensor_continues_it_after_the_restart(tmp_path):
    platform = Platform(tmp_path)
    t0 = int(time.time() * 1e6) - 60_000_000
    packets = [(k * SAMPLES, t0 + k * PACKET_US, True) for k in range(20)]
    session_id = f"keep-1_{t0}"
    try:
        publish(platform, "keep-1", packets[:10])
        wait_until(lambda: sessions(platform, "sensor_id=keep-1"), timeout=30, message="the session is stored")
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])

    platform = Platform(tmp_path)
    try:
        resumed = sessions(platform, "sensor_id=keep-1&active=any")
        assert [(s["session_id"], s["active"], s["end_reason"]) for s in resumed] == [(session_id, True, None)]
        publish(platform, "keep-1", packets[10:])
        done = wait_until(
            lambda: [s for s in sessions(platform, "sensor_id=keep-1&active=any") if s["sample_count"] == 20 * SAMPLES],
            timeout=30,
            message="the session's sample count covering both runs",
        )
        every = sessions(platform, "sensor_id=keep-1&active=any")
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    assert [s["session_id"] for s in done] == [session_id]
    assert [s["session_id"] for s in every] == [session_id], f"one session across the restart, got {every}"
    assert every[0]["active"] is True and every[0]["aggregate"]["sample_count"] == 20 * SAMPLES

    samples = pq.read_table(str(tmp_path / "lake" / "samples"), columns=["sensor_id", "session_id", "sample_index"]).to_pylist()
    assert sorted(r["sample_index"] for r in samples) == list(range(20 * SAMPLES))
    assert {r["session_id"] for r in samples} == {session_id}


def test_the_log_on_a_pipe_has_no_colour_codes_one_log_opened_line_and_no_ntex_noise(tmp_path):
    # The default filter, as a user who sets nothing gets it.
    platform = Platform(tmp_path, env={"SENSORFLOW_LOG": None, "RUST_LOG": None})
    try:
        publish(platform, "log-1", [(0, int(time.time() * 1e6), True)])
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
    text = "\n".join(platform.log_lines)
    assert any("mqtt listening on" in line for line in platform.log_lines)
    assert "\x1b[" not in text, "ANSI escape codes in a log written to a pipe"
    assert sum("log opened" in line for line in platform.log_lines) == 1, text
    assert "IO Configuration" not in text
