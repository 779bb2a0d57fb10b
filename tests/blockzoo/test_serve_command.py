"""`blockzoo serve --demo` (what `make serve` runs): builds the demo zoo once and prints a curl that works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.router.live_server import free_port


def start(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "BLOCKZOO_DATA_DIR": str(data_dir), "BLOCKZOO_KV_CACHE_MEMORY": str(8 << 20)}
    env.pop("BLOCKZOO_ADMIN_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockzoo.cli", "serve", "--demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("Demo tenant keys"):
            return proc, lines
    proc.kill()
    raise AssertionError("serve did not print its banner:\n" + "\n".join(lines))


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/ready"], capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("server never became ready")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


def test_serve_demo_prints_a_working_curl_and_the_admin_key_once(tmp_path: Path) -> None:
    port = free_port()
    proc, lines = start(tmp_path / "data", port)
    try:
        assert any(line.startswith("Admin key (shown once") for line in lines)
        assert any(f"http://127.0.0.1:{port}/admin/v1" in line for line in lines)
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        wait_ready(port)
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
        body = json.loads(out.stdout)
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] > 0
    finally:
        stop(proc)
    # A second start reuses the demo zoo and does not print (or change) the admin key.
    proc, lines = start(tmp_path / "data", port)
    try:
        assert not any(line.startswith("Admin key") for line in lines)
        assert any(line.strip().startswith("curl ") for line in lines)
    finally:
        stop(proc)
