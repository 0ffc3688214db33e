"""Shared helpers for the end-to-end tests: a device packet encoder written independently from
the Rust one (straight from DESIGN.md, so the two cross-check each other), and a Platform
fixture that runs the real `sensorflow` binary on free ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pyarrow.parquet as pq
import requests
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[2]
PERIOD_US = 5000


def _crc16_arc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16_ARC = _crc16_arc_table()


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (reflected 0x8005, init 0), byte-table form; check value 0xBB3D."""
    crc = 0
    for b in data:
        crc = (crc >> 8) ^ _CRC16_ARC[(crc ^ b) & 0xFF]
    return crc


assert crc16_arc(b"123456789") == 0xBB3D


def encode_packet(base: int, timestamp_us: int, samples: list[tuple]) -> bytes:
    """samples: (acc3 raw i16, gyro3 raw i16, mag3 raw i16, temp i16) tuples."""
    body = bytearray()
    body += struct.pack("<IQH", base, timestamp_us, len(samples))
    for acc, gyro, mag, temp in samples:
        body += struct.pack(">3h", *acc)
        body += struct.pack(">3h", *gyro)
        body += struct.pack("<3h", *mag)
        body += struct.pack(">h", temp)
    frame = bytes([0x7C, 0x1E]) + struct.pack("<H", len(body)) + bytes(body)
    return frame + struct.pack("<H", crc16_arc(frame))


def synthetic_samples(n: int, seed: int, moving: bool = True) -> list[tuple]:
    """Deterministic raw samples: ~1 g on z with some motion."""
    import math

    out = []
    for i in range(n):
        t = (seed * 1000 + i) * 0.005
        amp = 0.8 if moving else 0.0
        acc_g = (0.3 * amp * math.sin(2 * math.pi * 2 * t), 0.1 * amp * math.sin(math.pi * 2 * t), 1.0 + 0.25 * amp * math.sin(2 * math.pi * 2 * t + 0.5))
        gyro_dps = (40 * amp * math.sin(2 * math.pi * 2 * t + 1), 25 * amp * math.sin(math.pi * 2 * t), 10 * amp * math.sin(2 * math.pi * 2 * t))
        acc = tuple(int(round(a / (0.488 / 1000))) for a in acc_g)
        gyro = tuple(int(round(g / 0.140)) for g in gyro_dps)
        mag = (300, -200, 500)
        out.append((acc, gyro, mag, 2500))
    return out


def json_packet(base: int, timestamp_us: int, samples: list[tuple]) -> bytes:
    def phys(s):
        acc, gyro, mag, temp = s
        return {
            "acc": dict(zip("xyz", (a * 0.488 / 1000 for a in acc))),
            "gyro": dict(zip("xyz", (g * 0.140 for g in gyro))),
            "mag": dict(zip("xyz", (m / 1711 for m in mag))),
            "temp_raw": temp,
        }

    return json.dumps({"timestamp_us": timestamp_us, "base_sample_number": base, "samples": [phys(s) for s in samples]}).encode()


def binary_path() -> Path:
    env = os.environ.get("SENSORFLOW_BIN")
    if env:
        return Path(env)
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "sensorflow"
        if p.exists():
            return p
    raise RuntimeError("sensorflow binary not built: run `cargo build` (or set SENSORFLOW_BIN)")


class Platform:
    """`sensorflow run|demo` on free loopback ports with its own data dir."""

    def __init__(
        self,
        data_dir: Path | None,
        command: str = "run",
        extra_args: list[str] | None = None,
        env: dict | None = None,
        mqtt_listen: str = "127.0.0.1:0",
        http_listen: str = "127.0.0.1:0",
        tls_ca: str | None = None,
        mqtt: bool = True,
    ):
        # With tls_ca (a CA file that signed the platform's tls.cert_file), HTTP is HTTPS.
        self.tls_ca = tls_ca
        # No data dir for roles that keep no local state (`gateway`): pass None.
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.log_lines: list[str] = []
        args = [str(binary_path()), command]
        args += ["--data-dir", str(self.data_dir)] if self.data_dir is not None else []
        # Roles without MQTT (`processor`, `api`) only log their HTTP address.
        self.needs = {"mqtt", "http"} if mqtt else {"http"}
        args += ["--mqtt-listen", mqtt_listen] if mqtt else []
        args += ["--http-listen", http_listen]
        args += extra_args or []
        full_env = dict(os.environ)
        full_env.setdefault("SENSORFLOW_LOG", "info")
        full_env.update(env or {})
        # A None value unsets the variable (e.g. SENSORFLOW_LOG, to run with the default filter).
        full_env = {k: v for k, v in full_env.items() if v is not None}
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=full_env)
        self._addresses: dict[str, str] = {}
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout=120):
            self.stop()
            raise RuntimeError("platform did not report its addresses:\n" + "\n".join(self.log_lines[-50:]))
        if not self.needs <= set(self._addresses):
            self.stop()
            raise RuntimeError("platform exited before listening:\n" + "\n".join(self.log_lines[-50:]))
        if mqtt:
            host, port = self._addresses["mqtt"].rsplit(":", 1)
            self.mqtt_host, self.mqtt_port = host, int(port)
        self.http = ("https://" if tls_ca else "http://") + self._addresses["http"]
        self.mqtts_port = int(self._addresses["mqtts"].rsplit(":", 1)[1]) if "mqtts" in self._addresses else None
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.http + "/health", timeout=2, verify=tls_ca or True).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("platform /health did not answer")
            time.sleep(0.05)

    def _read_log(self):
        pattern = re.compile(r"(mqtts|mqtt|http) listening on (\S+)")
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.log_lines.append(line)
            m = pattern.search(line)
            if m:
                self._addresses[m.group(1)] = m.group(2)
                if self.needs <= set(self._addresses):
                    self._ready.set()
        self._ready.set()

    @property
    def ws(self) -> str:
        return self.http.replace("https://", "wss://").replace("http://", "ws://")

    def get(self, path: str, **kw):
        if self.tls_ca:
            kw.setdefault("verify", self.tls_ca)
        return requests.get(self.http + path, timeout=10, **kw)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: a graceful stop drains the pipeline and flushes the lake."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` of its log under a header naming the role and data dir, for a failed
        test to print."""
        where = f" {self.data_dir}" if self.data_dir is not None else ""
        return f"--- {self.proc.args[1]}{where}:\n" + "\n".join(self.log_lines[-lines:])


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Polls `predicate` until it returns a truthy value; raises with `message` on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


class WsCollector:
    """Collects every JSON message of one WebSocket in a background thread."""

    def __init__(self, url: str):
        self.messages: list = []
        self.error: Exception | None = None
        self._ws = ws_connect(url, open_timeout=10)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for text in self._ws:
                self.messages.append(json.loads(text))
        except Exception as e:  # the feed ended; kept for the test's messages
            self.error = e

    def rows(self) -> list[dict]:
        """Rows of the messages so far (`/ws/raw` sends arrays of rows)."""
        return [r for m in list(self.messages) for r in (m if isinstance(m, list) else [m])]

    def close(self):
        self._ws.close()
        self._thread.join(timeout=5)


class Publisher:
    """One persistent-session paho client per sensor (MQTT 3.1.1, QoS 1) that records the key
    of every publish the broker acknowledged (PUBACK), with the time of the acknowledgement.

    paho's in-flight window is unlimited by default here: with a limit, paho queues messages
    beyond it and a publish() from another thread can overtake the queued ones when a PUBACK
    frees a slot, so a device's packets would reach the broker out of order (a real device
    sends in order; the callers bound what they keep outstanding themselves)."""

    def __init__(self, host: str, port: int, max_inflight: int = 0):
        self.acked: dict = {}
        self.published: set = set()
        self.lock = threading.Lock()
        self.clients: dict[str, mqtt.Client] = {}
        self.mids: dict = {}
        self.early: dict = {}
        self.host, self.port, self.max_inflight = host, port, max_inflight

    def client(self, sid: str) -> mqtt.Client:
        if sid not in self.clients:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{sid}", clean_session=False, protocol=mqtt.MQTTv311)
            c.max_inflight_messages_set(self.max_inflight)
            c.max_queued_messages_set(0)
            c.reconnect_delay_set(min_delay=0.05, max_delay=0.5)

            def on_publish(client, userdata, mid, reason_code, properties, sid=sid):
                now = time.monotonic()
                with self.lock:
                    key = self.mids.pop((sid, mid), None)
                    if key is None:
                        self.early[(sid, mid)] = now  # acked before publish() recorded the mid
                    else:
                        self.acked[key] = now

            c.on_publish = on_publish
            c.connect(self.host, self.port, keepalive=30)
            c.loop_start()
            self.clients[sid] = c
        return self.clients[sid]

    def publish(self, sid: str, key, payload: bytes, topic: str | None = None):
        c = self.client(sid)
        # Not under self.lock: paho calls on_publish holding its own lock, so taking ours
        # around c.publish (which takes paho's) could deadlock.
        info = c.publish(topic or f"stream/{sid}", payload, qos=1)
        with self.lock:
            self.published.add(key)
            early = self.early.pop((sid, info.mid), None)
            if early is None:
                self.mids[(sid, info.mid)] = key
            else:
                self.acked[key] = early

    def unacked(self) -> int:
        with self.lock:
            return len(self.published) - len(self.acked)

    def wait_all_acked(self, timeout: float):
        wait_until(lambda: self.unacked() == 0, timeout=timeout, interval=0.2, message=f"all {len(self.published)} publishes acknowledged")

    def close(self):
        for c in self.clients.values():
            c.disconnect()
            c.loop_stop()


def metric(text: str, name: str) -> float:
    """Value of an unlabelled metric in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exported")


def check_lake_exactly_once(lake: Path, acked_packets, samples_per_packet: int = 64):
    """Every committed lake file reads; no (sensor, sample index) twice in `samples`; every
    sample of every acknowledged packet (sensor_id, base index) present."""
    files = sorted(lake.glob("*/date=*/*.parquet"))
    assert files, "no lake files"
    for f in files:
        pq.read_table(f)
    samples = pq.read_table(str(lake / "samples"), columns=["sensor_id", "sample_index"]).to_pylist()
    pairs = [(r["sensor_id"], r["sample_index"]) for r in samples]
    assert len(pairs) == len(set(pairs)), f"{len(pairs) - len(set(pairs))} duplicate samples in the lake"
    present = set(pairs)
    missing = [(sid, base + i) for sid, base in acked_packets for i in range(samples_per_packet) if (sid, base + i) not in present]
    assert not missing, f"{len(missing)} acknowledged samples missing, e.g. {missing[:5]}"


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class S3Server:
    """A real S3-compatible HTTP server (moto's server mode, from PyPI) on a loopback port.

    MinIO would be the production-like choice, but building it from the Go module proxy takes
    longer than this whole suite may; moto speaks the same REST API (multipart uploads, ranges,
    listing) and the platform talks to it through the same `object_store` client as to AWS.
    Started once per test session (`s3_server` fixture in conftest.py)."""

    ACCESS_KEY = "sensorflow-test"
    SECRET_KEY = "sensorflow-test-secret"
    REGION = "us-east-1"

    def __init__(self):
        port = free_ports(1)[0]
        moto = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"

        def answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                return requests.get(self.endpoint, timeout=2).status_code < 500
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout=60, message="the S3 server to answer")

    @property
    def env(self) -> dict:
        """The standard AWS variables that point a client (ours, boto3) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_REGION": self.REGION,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name=self.REGION,
        )

    def new_bucket(self, prefix: str = "test") -> str:
        """A fresh bucket per test, so tests sharing the server never see each other's objects."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: the sockets stay bound until all are chosen, since two
    separate binds to port 0 may get the same port (seen once: a broker's PLAINTEXT and
    CONTROLLER listeners on one port, so it could not start)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class KafkaBroker:
    """A real Apache Kafka 4.1.1 broker (KRaft: broker and controller in one JVM) on free
    loopback ports with its own log dir, run through scripts/kafka.sh (jars from Maven Central,
    cached). Started once per test session (`kafka_broker` fixture in conftest.py).

    `kill()`, `stop()`, `pause()` (SIGSTOP), `resume()` and `start()` (again, same ports and
    data) let tests take the broker away and bring it back; `node_id`, `voters` and `extra`
    leave room for a 3-broker cluster built from three of these."""

    SCRIPT = ROOT / "scripts" / "kafka.sh"

    def __init__(self, base_dir: Path, node_id: int = 1, voters: str | None = None, extra: dict | None = None, start: bool = True,
                 ports: tuple[int, int] | None = None, cluster_id: str | None = None):
        # `ports` (broker, controller) and `cluster_id` come from a KafkaCluster, which needs
        # every node's controller port in `voters` and one cluster id on every log dir.
        self.dir = Path(base_dir)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.port, self.controller_port = ports or tuple(free_ports(2))
        self.props = self.dir / "server.properties"
        voters = voters or f"{node_id}@127.0.0.1:{self.controller_port}"
        single = voters.count("@") == 1
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.dir / "logs"),
            "num.partitions": "1",
            # The platform creates its topics itself (kafka.partitions): a test must see that.
            "auto.create.topics.enable": "false",
            "group.initial.rebalance.delay.ms": "0",
        }
        if single:
            for k in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                      "transaction.state.log.min.isr", "share.coordinator.state.topic.replication.factor",
                      "share.coordinator.state.topic.min.isr"):
                props[k] = "1"
        props.update(extra or {})
        self.props.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.log_path = self.dir / "broker.log"
        self.proc: subprocess.Popen | None = None
        self.started_in: float | None = None
        if cluster_id is None:
            format_cmd = [str(self.SCRIPT), "format", str(self.props)]  # a new cluster id
        else:
            format_cmd = ["java", "-cp", kafka_classpath(), "kafka.tools.StorageTool", "format", "--ignore-formatted",
                          "-t", cluster_id, "-c", str(self.props)]
        with open(self.dir / "format.log", "w") as log:
            subprocess.run(format_cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        if start:
            self.start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120):
        """Starts the JVM (again) and waits until the broker answers a metadata request."""
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        t0 = time.monotonic()
        self.proc = subprocess.Popen([str(self.SCRIPT), "run", str(self.props)], stdout=open(self.log_path, "a"),
                                     stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        self.started_in = time.monotonic() - t0

    def answers(self) -> bool:
        from confluent_kafka.admin import AdminClient

        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"kafka broker exited with {self.proc and self.proc.returncode}; see {self.log_path}")
        try:
            # The port first: a client pointed at a closed port logs every reconnect attempt.
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        try:
            md = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0}).list_topics(timeout=2)
            return len(md.brokers) > 0
        except Exception:
            return False

    def wait_ready(self, timeout: float = 120):
        wait_until(self.answers, timeout=timeout, interval=0.5, message=f"the kafka broker on {self.bootstrap}")

    def pause(self):
        """SIGSTOP: the broker keeps its sockets but answers nothing (a hung broker)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        """SIGKILL: a crash (the log dir keeps what was flushed; acks=all data is safe only
        with replicas, so tests of a single broker use stop() or pause())."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 60):
        """SIGTERM: a controlled shutdown that flushes the logs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def static_port(taken: set[int]) -> int:
    """A free loopback port below the kernel's ephemeral range (which port-0 binds draw from),
    so no other process is handed it while its owner is down; not one of `taken`, to which it
    is added."""
    import random

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randint(10000, low - 1)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


_KAFKA_CLASSPATH: str | None = None


def kafka_classpath() -> str:
    """The Java classpath of scripts/kafka.sh's Kafka jars (fetched once, cached)."""
    global _KAFKA_CLASSPATH
    if _KAFKA_CLASSPATH is None:
        _KAFKA_CLASSPATH = subprocess.run([str(KafkaBroker.SCRIPT), "classpath"], check=True, capture_output=True,
                                          text=True).stdout.strip()
    return _KAFKA_CLASSPATH


def java_string_hash(s: str) -> int:
    """Java's String.hashCode (signed 32 bits), for strings of the Basic Multilingual Plane."""
    h = 0
    for ch in s:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def coordinator_partition(key: str, partitions: int) -> int:
    """The partition of `__consumer_offsets` (key: a group id) or `__transaction_state` (key: a
    transactional id) whose leader is the key's coordinator: Kafka's
    `Utils.abs(key.hashCode()) % partitions`."""
    h = java_string_hash(key)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


class KafkaCluster:
    """A real Apache Kafka 4.1.1 cluster on loopback: `nodes` KRaft nodes, each broker and
    controller, every one a voter of the metadata quorum, formatted with one cluster id. Internal
    topics are replicated to 3 with a minimum ISR of 2, and so is every topic created without
    its own settings (`default.replication.factor`, `min.insync.replicas`), so the cluster
    keeps accepting `acks=all` writes and transactions with one node dead.

    `brokers[i]` are KafkaBrokers: kill, stop and start them one by one. The internal topics
    get `internal_partitions` partitions (Kafka's default is 50) to keep their creation quick."""

    def __init__(self, base_dir: Path, nodes: int = 3, extra: dict | None = None, internal_partitions: int = 6,
                 timeout: float = 120):
        from concurrent.futures import ThreadPoolExecutor

        # Every controller port first: each node's controller.quorum.voters names all of them.
        # Below the ephemeral range, so no listener on port 0 (a gateway, an HTTP server) is
        # handed the ports of a node a test killed, and the node restarts on them.
        taken: set[int] = set()
        ports = [(static_port(taken), static_port(taken)) for _ in range(nodes)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{cport}" for i, (_, cport) in enumerate(ports))
        rf, min_isr = str(min(3, nodes)), str(min(2, nodes))
        props = {
            "default.replication.factor": rf,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": str(internal_partitions),
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": str(internal_partitions),
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": min_isr,
        }
        props.update(extra or {})
        self.internal_partitions = internal_partitions
        # A Kafka Uuid (16 random bytes, URL-safe base64 without padding); not one that starts
        # with "-", which the format tool would take for an option.
        import base64

        while (cluster_id := base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")).startswith("-"):
            pass
        self.cluster_id = cluster_id
        base_dir = Path(base_dir)
        self.brokers: list[KafkaBroker] = []
        with ThreadPoolExecutor(nodes) as pool:
            self.brokers = list(pool.map(
                lambda i: KafkaBroker(base_dir / f"node{i + 1}", node_id=i + 1, voters=voters, extra=props, start=False,
                                      ports=ports[i], cluster_id=cluster_id),
                range(nodes)))
        try:
            self.start(timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def bootstrap(self) -> str:
        """Every node's address: a client still finds the cluster with any one of them dead."""
        return ",".join(b.bootstrap for b in self.brokers)

    def broker(self, node_id: int) -> KafkaBroker:
        return next(b for b in self.brokers if b.node_id == node_id)

    def running(self) -> list[KafkaBroker]:
        return [b for b in self.brokers if b.proc is not None and b.proc.poll() is None]

    def start(self, timeout: float = 120):
        """Starts every node that is not running, in parallel (a node waits for a quorum of
        voters), and waits until the metadata lists every node as a broker."""
        from concurrent.futures import ThreadPoolExecutor

        stopped = [b for b in self.brokers if b not in self.running()]
        with ThreadPoolExecutor(max(1, len(stopped))) as pool:
            for f in [pool.submit(b.start, timeout) for b in stopped]:
                f.result()
        wait_until(lambda: len(self.registered()) == len(self.brokers), timeout=timeout, interval=0.5,
                   message=f"all {len(self.brokers)} kafka nodes registered as brokers")

    def registered(self) -> set[int]:
        """Node ids the cluster metadata lists as brokers (a dead one until its session expires)."""
        from confluent_kafka.admin import AdminClient

        addrs = ",".join(b.bootstrap for b in self.running())
        try:
            return set(AdminClient({"bootstrap.servers": addrs, "log_level": 0}).list_topics(timeout=5).brokers)
        except Exception:
            return set()

    def controller_leader(self) -> int:
        """The node id of the active controller (the metadata quorum's leader), as
        kafka-metadata-quorum reports it (DescribeQuorum to the controllers)."""
        controllers = ",".join(f"127.0.0.1:{b.controller_port}" for b in self.running())
        out = subprocess.run(
            ["java", "-Xmx256m", "-XX:TieredStopAtLevel=1", f"-Dlog4j2.configurationFile={KafkaBroker.SCRIPT.parent / 'kafka' / 'log4j2.properties'}",
             "-cp", kafka_classpath(), "org.apache.kafka.tools.MetadataQuorumCommand", "--bootstrap-controller", controllers,
             "describe", "--status"],
            check=True, capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"^LeaderId:\s+(\d+)", out, re.M)
        assert m, f"no LeaderId in kafka-metadata-quorum's answer:\n{out}"
        return int(m.group(1))

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for b in self.brokers:
            text = b.log_path.read_text(errors="replace").splitlines() if b.log_path.exists() else []
            out.append(f"--- kafka node {b.node_id} ({b.log_path}):\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def stop(self):
        """SIGTERM to every node at once, then wait (one at a time, the last nodes would wait
        for a quorum that is already gone)."""
        for b in self.running():
            b.proc.send_signal(signal.SIGCONT)
            b.proc.terminate()
        for b in self.brokers:
            if b.proc is not None:
                try:
                    b.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    b.proc.kill()
                    b.proc.wait()


def decode_ingest_record(value: bytes) -> dict:
    """The ingest record as DESIGN/protocol's record.rs lay it out, decoded independently:
    version u8 (= 1), payload format u8 (0 binary, 1 JSON), ingest_us i64 LE, sensor id length
    u16 LE, sensor id UTF-8, then the payload (the rest)."""
    if len(value) < 12:
        raise ValueError(f"ingest record of {len(value)} bytes is truncated")
    version, fmt, ingest_us, n = struct.unpack_from("<BBqH", value, 0)
    if version != 1:
        raise ValueError(f"ingest record version {version}")
    if fmt not in (0, 1):
        raise ValueError(f"payload format {fmt}")
    if len(value) < 12 + n:
        raise ValueError("sensor id truncated")
    return {
        "format": "binary" if fmt == 0 else "json",
        "ingest_us": ingest_us,
        "sensor_id": value[12:12 + n].decode("utf-8"),
        "payload": value[12 + n:],
    }


def read_topic(bootstrap: str, topic: str, idle_s: float = 3.0, timeout: float = 60) -> list:
    """Every committed record of `topic` from the beginning (isolation.level=read_committed),
    read until nothing new arrived for `idle_s` after reaching the end of every partition."""
    from confluent_kafka import Consumer, KafkaError

    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    c.subscribe([topic])
    out, eof, last_new = [], set(), time.monotonic()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                if eof and time.monotonic() - last_new > idle_s:
                    assigned = {p.partition for p in c.assignment()}
                    if assigned and assigned <= eof:
                        break
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                raise RuntimeError(f"consumer error: {m.error()}")
            eof.discard(m.partition())
            last_new = time.monotonic()
            out.append(m)
        else:
            raise AssertionError(f"reading {topic} did not reach its end within {timeout}s")
    finally:
        c.close()
    return out


def read_topic_to_end(bootstrap: str, topic: str) -> list:
    """Every committed record of `topic` up to the end offsets it had when called (the topic
    keeps growing: running processors emit aggregates every second)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
    })
    try:
        parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
        highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        done = {p for p in parts if highs[p] == 0}
        out = []
        deadline = time.monotonic() + 60
        while len(done) < len(parts):
            assert time.monotonic() < deadline, f"reading {topic} to its end took over 60 s"
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    if c.position([TopicPartition(topic, m.partition())])[0].offset >= highs[m.partition()]:
                        done.add(m.partition())
                    continue
                raise RuntimeError(f"consumer error: {m.error()}")
            if m.offset() < highs[m.partition()]:
                out.append(m)
            if m.offset() + 1 >= highs[m.partition()]:
                done.add(m.partition())
        return out
    finally:
        c.close()


def sample_rows(bootstrap: str, topic: str) -> list[dict]:
    """The sample rows of a JSON output topic (`sensor-data-transformed`), each record checked
    to be keyed by its sensor id."""
    rows = []
    for m in read_topic(bootstrap, topic, idle_s=1.0):
        value = json.loads(m.value())
        batch = value if isinstance(value, list) else [value]
        for r in batch:
            assert m.key().decode() == r["sensor_id"], "keyed by sensor id"
        rows += batch
    return rows


def wait_for_sample_rows(bootstrap: str, topic: str, expected: set, timeout: float, message: str,
                         interval: float = 1) -> list[dict]:
    """Reads `topic`'s sample rows (see `sample_rows`) until they hold as many distinct
    `(sensor_id, sample_index)` keys as `expected` has, and returns that read's rows: what the
    caller then checks for doubles and for exactly the expected keys."""
    rows: list[dict] = []

    def complete():
        nonlocal rows
        rows = sample_rows(bootstrap, topic)
        return len({(r["sensor_id"], r["sample_index"]) for r in rows}) >= len(expected)

    wait_until(complete, timeout=timeout, interval=interval, message=message)
    return rows


def processor_config(tmp_path, name: str, uid: str, ingest: str | None = None, group: str | None = None,
                     instance: str | None = None, replication_factor: int | None = None,
                     stall_timeout_ms: int | None = None) -> str:
    """A `processor` config file whose output topics, changelog and group belong to one run
    (`uid`); `ingest` defaults to `ingest-{uid}`, `group` to `processors-{uid}`; `instance` fixes
    the transactional id (`sensorflow-processor-{instance}`) and so its coordinator;
    `stall_timeout_ms` sets the stall watchdog's timeout. Commits every 500 ms, aggregates every
    second and lake files of at most a second keep tests short."""
    ingest = ingest or f"ingest-{uid}"
    group = group or f"processors-{uid}"
    replication = f"replication_factor = {replication_factor}\n" if replication_factor else ""
    processor_lines = f'instance_id = "{instance}"\n' if instance else ""
    processor_lines += f"stall_timeout_ms = {stall_timeout_ms}\n" if stall_timeout_ms is not None else ""
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[kafka]
partitions = 6
{replication}[kafka.topics]
ingest = "{ingest}"
transformed = "transformed-{uid}"
aggregated = "aggregated-{uid}"
sessions = "sessions-{uid}"
windows = "windows-{uid}"
gaps = "gaps-{uid}"
late = "late-{uid}"
changelog = "state-{uid}"
[kafka.processor]
group_id = "{group}"
commit_interval_ms = 500
{processor_lines}[pipeline]
aggregate_interval_secs = 1.0
[lake]
max_file_age_secs = 1
""")
    return str(path)
