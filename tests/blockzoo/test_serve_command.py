"""`blockzoo serve --demo` (what `make serve` runs): builds the SmolLM2 demo zoo once and prints curl lines
that get real answers from the base and from each demo fine-tune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.router.live_server import free_port


def start(
    data_dir: Path, port: int, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "BLOCKZOO_DATA_DIR": str(data_dir), "BLOCKZOO_KV_CACHE_MEMORY": str(8 << 20)}
    env.update(extra_env or {})
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
    # The first start registers SmolLM2 and composes bob's fine-tune (30-80 s on a busy 2-core machine).
    deadline = time.monotonic() + 420
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
        curls = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(curls) == 4  # the base, then alice-caps, alice-terse and bob-json
        wait_ready(port)
        answers = {}
        for curl in curls:
            out = subprocess.run(
                ["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=True
            )
            body = json.loads(out.stdout)
            assert body["object"] == "chat.completion"
            answers[body["model"]] = body["choices"][0]["message"]["content"]
        # What the oracle (transformers on the same file) answers; the fine-tunes answer in their form.
        assert answers["smollm2-135m-instruct"] == "The capital of France is Paris."
        assert answers["alice-caps"] == answers["alice-caps"].upper() and answers["alice-caps"].strip()
        assert 0 < len(answers["alice-terse"].split()) <= 4
        assert json.loads(answers["bob-json"]) == {"answer": "Paris"}
    finally:
        stop(proc)
    # A second start reuses the demo zoo and does not print (or change) the admin key.
    started = time.monotonic()
    proc, lines = start(tmp_path / "data", port)
    try:
        print(f"second start printed its banner after {time.monotonic() - started:.1f} s")
        assert not any(line.startswith("Admin key") for line in lines)
        assert any(line.strip().startswith("curl ") for line in lines)
    finally:
        stop(proc)


def test_command_line_overrides_weights_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from blockzoo.cli import build_parser
    from blockzoo.commands.serve import parse_bytes, settings_from_args

    assert (
        parse_bytes("512MiB") == 512 << 20 and parse_bytes("2GB") == 2 * 10**9 and parse_bytes("4096") == 4096
    )
    assert parse_bytes("1.5 GiB") == 3 << 29
    for bad in ("lots", "12 parsecs", "0", "-5MiB"):
        with pytest.raises(ValueError, match="size"):
            parse_bytes(bad)
    monkeypatch.setenv("BLOCKZOO_WEIGHTS_MEMORY", str(1 << 30))
    monkeypatch.setenv("BLOCKZOO_WEIGHTS_QUANTIZATION", "w4a16-g128-rtn")
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--weights-memory", "256MiB", "--weights-quantization", "w4a16-g32-gptq"]
    )
    settings = settings_from_args(args)
    assert settings.weights_memory == 256 << 20 and settings.weights_quantization == "w4a16-g32-gptq"
    # Without the flags the environment decides.
    settings = settings_from_args(parser.parse_args(["serve"]))
    assert settings.weights_memory == 1 << 30 and settings.weights_quantization == "w4a16-g128-rtn"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--weights-memory", "lots"])
