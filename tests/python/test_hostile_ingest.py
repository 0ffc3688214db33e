"""Hostile input never stops the platform: oversized MQTT frames are refused from their fixed
header, half-sent HTTP requests are closed after the header timeout, and good clients keep
being served meanwhile. Against the real binary."""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as mqtt

from testkit import Platform, encode_packet, rss_mb, synthetic_samples, wait_until

HUGE = bytes([0xFF, 0xFF, 0xFF, 0x7F])  # remaining length 256 MiB - 1


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes `sock` (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


class AckCounter:
    """A paho MQTT 3.1.1 QoS 1 publisher counting PUBACKs."""

    def __init__(self, host: str, port: int):
        self.acks = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="good-publisher", protocol=mqtt.MQTTv311)
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.sent = 0

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acks += 1

    def publish(self):
        payload = encode_packet(self.sent * 64, 1_700_000_000_000_000 + self.sent * 640_000, synthetic_samples(64, seed=self.sent))
        self.client.publish("stream/good-1", payload, qos=1)
        self.sent += 1

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_hostile_mqtt_and_http_clients_do_not_stop_the_platform(tmp_path):
    platform = Platform(tmp_path / "data", env={"SENSORFLOW_HTTP_HEADER_READ_TIMEOUT_SECS": "2"})
    try:
        wait_until(lambda: platform.get("/ready").status_code == 200, timeout=30, message="ready")
        good = AckCounter(platform.mqtt_host, platform.mqtt_port)
        good.publish()
        wait_until(lambda: good.acks == 1, timeout=30, message="first PUBACK")
        rss_before = rss_mb(platform.proc.pid)

        # 20 CONNECTs each declaring 256 MiB: only the fixed header and the protocol version
        # are sent. Buffered whole they would need 5 GiB; refused, the socket is closed.
        for _ in range(20):
            s = socket.create_connection((platform.mqtt_host, platform.mqtt_port))
            s.sendall(b"\x10" + HUGE + b"\x00\x04MQTT\x04\x02\x00\x3c")
            assert closed_by_peer(s, 5), "a 256 MiB CONNECT was not refused"
            s.close()
        good.publish()
        wait_until(lambda: good.acks == 2, timeout=30, message="PUBACK after the oversized CONNECTs")
        grown = rss_mb(platform.proc.pid) - rss_before
        assert grown < 64, f"RSS grew by {grown:.0f} MiB"
        metrics = platform.get("/metrics").text
        assert "sensorflow_mqtt_packets_too_large_total 20" in metrics

        # 200 half-sent HTTP requests: all closed after the 2 s header timeout.
        flood = []
        http_host, http_port = platform.http.removeprefix("http://").rsplit(":", 1)
        for _ in range(200):
            s = socket.create_connection((http_host, int(http_port)))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            flood.append(s)
        assert platform.get("/health").status_code == 200, "/health answers during the flood"
        started = time.monotonic()
        for s in flood:
            assert closed_by_peer(s, 15), "a half-sent request was kept open"
            s.close()
        assert time.monotonic() - started < 15
        assert platform.get("/health").status_code == 200
        assert platform.get("/ready").status_code == 200
        good.publish()
        wait_until(lambda: good.acks == 3, timeout=30, message="PUBACK after the HTTP flood")
        good.close()
    finally:
        platform.stop()


def test_sensors_are_paged_and_oversize_on_a_new_sensor_is_visible(tmp_path):
    platform = Platform(tmp_path / "data")
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pager", protocol=mqtt.MQTTv311)
        acks = []
        c.on_publish = lambda client, userdata, mid, rc, props: acks.append(mid)
        c.connect(platform.mqtt_host, platform.mqtt_port, keepalive=30)
        c.loop_start()
        for i, sid in enumerate(["page-a", "page-b", "page-c", "other-1"]):
            c.publish(f"stream/{sid}", encode_packet(0, 1_700_000_000_000_000, synthetic_samples(64, seed=i)), qos=1)
        # Oversize (above the default 256 KiB) on a sensor never seen before.
        c.publish("stream/never-seen", b"x" * 300_000, qos=1)
        wait_until(lambda: len(acks) == 5, timeout=30, message="5 PUBACKs")
        c.disconnect()
        c.loop_stop()

        def page():
            r = platform.get("/sensors?limit=2&prefix=page-")
            return r.json(), r.headers.get("X-Total-Count")

        wait_until(lambda: page()[1] == "3", timeout=30, message="3 page- sensors")
        body, total = page()
        assert [s["sensor_id"] for s in body] == ["page-a", "page-b"]
        rest = platform.get("/sensors?limit=2&offset=2&prefix=page-").json()
        assert [s["sensor_id"] for s in rest] == ["page-c"]
        assert platform.get("/sensors?limit=0").status_code == 400

        wait_until(lambda: platform.get("/sensors?prefix=never-seen").json(), timeout=30, message="never-seen listed")
        seen = platform.get("/sensors/never-seen").json()
        assert seen["bad"] == {"oversize": 1}
        assert 'sensorflow_sensor_bad_input_total{sensor_id="never-seen",reason="oversize"} 1' in platform.get("/metrics").text
    finally:
        platform.stop()
