import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testkit import S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server for the whole session; each test takes its own bucket."""
    server = S3Server()
    yield server
    server.stop()
