"""The dashboard in a real browser (Debian's chromium driven by playwright-core) while
`sensorflow demo` feeds it live data."""

import os
import shutil
import subprocess

import pytest

from testkit import ROOT, Platform, binary_path, wait_until

BROWSER_DIR = ROOT / "tests" / "browser"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("with_token", [False, True], ids=["open", "token"])
def test_dashboard_shows_live_points_while_demo_runs(tmp_path, with_token):
    if not (BROWSER_DIR / "node_modules" / "playwright-core").exists():
        pytest.fail("playwright-core is not installed: run scripts/test.sh (it runs npm install in tests/browser)")
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run scripts/test.sh (it installs Debian's chromium)")
    env = {"SENSORFLOW_DEMO_SENSORS": "5"}
    headers = {}
    token = None
    if with_token:
        # The dashboard must ask for the token, keep it and use it (REST and WebSockets).
        tokens = tmp_path / "tokens"
        made = subprocess.run([str(binary_path()), "token", str(tokens), "browser"], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        env["SENSORFLOW_AUTH_API_TOKENS_FILE"] = str(tokens)
        headers = {"Authorization": f"Bearer {token}"}
    platform = Platform(tmp_path / "data", command="demo", env=env)
    try:
        # The demo's simulated sensors must be flowing before the page is judged.
        wait_until(lambda: len(platform.get("/sensors", headers=headers).json()) >= 5, timeout=60, message="5 demo sensors on /sensors")
        env = dict(os.environ, SENSORFLOW_URL=platform.http)
        if token:
            env["SENSORFLOW_TOKEN"] = token
        result = subprocess.run(["node", "--test", "--test-reporter=spec"], cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=300)
        print(result.stdout[-5000:])
        print(result.stderr[-5000:])
        assert result.returncode == 0, "browser test failed"
    finally:
        assert platform.stop() == 0, "\n".join(platform.log_lines[-40:])
