"""MQTT 3.1.1 QoS 2 across a reconnect between PUBREC and PUBCOMP (a regression test).

A persistent-session client whose connection drops between PUBREC and PUBCOMP (a platform
restart at that moment does it) must resend the PUBREL when it reconnects [MQTT-4.4.0-1], and
the server must answer PUBCOMP even for a packet id it no longer knows [MQTT-4.3.3]. ntex-mqtt
9.0.0's 3.1.1 dispatcher closed the connection instead, so the client reconnected, resent, was
disconnected, forever. The workspace now builds a vendored ntex-mqtt 9.0.0 carrying upstream's
fix (vendor/ntex-mqtt/SENSORFLOW-PATCH.md); without it this test fails. Debian's mosquitto
passes it too.
"""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt

from testkit import Platform, wait_until

PUBREL = 0x62


def read_packet(sock: socket.socket) -> bytes | None:
    """One whole MQTT control packet (fixed header included), or None at end of stream."""
    head = sock.recv(1)
    if not head:
        return None
    length, shift, raw = 0, 0, bytearray()
    while True:
        b = sock.recv(1)
        if not b:
            return None
        raw += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return bytes(head + raw + body)


class CuttingProxy:
    """Forwards MQTT between a client and `upstream`, except that the first PUBREL from the
    client is dropped together with the connection: the broker sees the PUBLISH and sends
    PUBREC, but never gets the PUBREL."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool):
        try:
            while (packet := read_packet(src)) is not None:
                if from_client and packet[0] == PUBREL and not self.cut.is_set():
                    self.cut.set()
                    break
                dst.sendall(packet)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_qos2_publish_completes_after_a_reconnect_between_pubrec_and_pubcomp(tmp_path):
    platform = Platform(tmp_path)
    proxy = CuttingProxy((platform.mqtt_host, platform.mqtt_port))
    completed: list[int] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="qos2-device", clean_session=False, protocol=mqtt.MQTTv311)
    client.reconnect_delay_set(min_delay=0.1, max_delay=0.2)
    client.on_publish = lambda c, u, mid, rc, p: completed.append(mid)
    try:
        client.connect("127.0.0.1", proxy.port, keepalive=30)
        client.loop_start()
        client.publish("stream/qos2-device", b"first", qos=2)
        wait_until(proxy.cut.is_set, timeout=10, message="the connection cut after PUBREL")
        client.publish("stream/qos2-device", b"second", qos=2)
        wait_until(lambda: len(completed) == 2, timeout=15, message="both QoS 2 publishes completed")
        assert proxy.connections <= 3, f"{proxy.connections} connections for one reconnect"
    finally:
        client.loop_stop()
        client.disconnect()
        proxy.close()
        assert platform.stop() == 0
