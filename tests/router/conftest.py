"""Router fixtures: a real `redis-server` per test session, and the zoo's catalog fixtures.

The Redis server runs from a temporary folder on a free port, without persistence; each test that
takes `redis_url` starts from an empty database.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# The catalog fixtures (SQLite and PostgreSQL, at head) live with the zoo tests; re-exported here.
from tests.zoo.conftest import (  # noqa: F401
    migrated_url,
    pg_admin,
    pg_migrated_database,
    pg_url,
    sqlite_migrated_template,
)

REDIS_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_ping(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not answer PING within {REDIS_START_TIMEOUT_S}s")
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a `redis-server` started for this test session, stopped at its end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (run `make services`)")
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    log_path = folder / "redis.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_ping(url, proc, log_path)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server
