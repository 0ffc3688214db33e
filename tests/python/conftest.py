import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testkit import KafkaBroker, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server for the whole session; each test takes its own bucket."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """One single-node Kafka broker (KRaft) for the whole session, on free loopback ports.
    Tests that pause or stop it bring it back before they end; topics are per test."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    yield broker
    broker.stop()
