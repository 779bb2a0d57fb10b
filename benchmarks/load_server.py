"""The load benchmark's server: `blockzoo serve` in a child process over a prepared demo zoo.

The server runs in its own process so that its resident memory (VmRSS) is its own and the clients do
not compete with it for one GIL. The data folder is prepared here first: the demo zoo (a tiny base,
three LoRA adapters, a partial fine-tune), a third tenant that uses only the base, and quotas far
above the load, so that every request takes and gives back a real quota lease without being refused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from transformers.utils import logging as transformers_logging

from benchmarks.serving_server import GENEROUS
from benchmarks.serving_workload import Target
from blockzoo.settings import Settings
from blockzoo.tiny_demo_zoo import ADAPTERS, BASE, ensure_demo_zoo
from blockzoo.zoo_factory import open_zoo
from zoo.catalog.database import factory_engine
from zoo.catalog.tenants import create_tenant, set_quotas

EXTRA_TENANT = "demo-carol"
READY_TIMEOUT_S = 120.0


def prepare(data_dir: Path) -> list[Target]:
    """Build the demo zoo and a third tenant in `data_dir`; the (model, key) pairs clients use."""
    transformers_logging.disable_progress_bar()
    settings = Settings(data_dir=data_dir, log_level="WARNING")
    zoo = open_zoo(settings)
    try:
        keys = ensure_demo_zoo(settings, zoo)
        with zoo.sessions() as session, session.begin():
            _, keys[EXTRA_TENANT] = create_tenant(session, EXTRA_TENANT)
            for tenant in keys:
                set_quotas(session, tenant, GENEROUS)
    finally:
        factory_engine(zoo.sessions).dispose()
    targets = [Target(model, keys[tenant], tenant) for tenant, model, _, _ in ADAPTERS]
    targets.append(Target("bob-partial", keys["demo-bob"], "demo-bob"))
    targets.extend(Target(BASE, keys[tenant], tenant) for tenant in sorted(keys))
    return targets


@dataclass
class ServerProcess:
    """A running `blockzoo serve`: its process, base URL and log file."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        """VmRSS of the server process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, summed over labels, by sample name."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        return sums

    def stop(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM (a drain), then wait: the exit status and the seconds it took."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - start

    def log_lines(self, word: str) -> int:
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if word in line)


class RedisServer:
    """A `redis-server` without persistence that the benchmark stops and starts again mid-load."""

    def __init__(self, folder: Path, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("--redis-outage needs redis-server on PATH (run `make services`)")
        self.command = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.folder = folder
        self.url = f"redis://127.0.0.1:{port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            self.command, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("redis-server did not answer PING")

    def in_flight(self) -> int:
        """The sum of every tenant's in-flight counter in Redis."""
        client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            return sum(int(client.get(key) or 0) for key in client.scan_iter("bz:q:*:conc"))
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


def start(data_dir: Path, port: int, env_overrides: dict[str, str]) -> ServerProcess:
    """`blockzoo serve` on `port` over `data_dir`, once it answers /ready."""
    env = {
        **os.environ,
        "BLOCKZOO_DATA_DIR": str(data_dir),
        "BLOCKZOO_LOG_LEVEL": "WARNING",
        **env_overrides,
    }
    env.pop("BLOCKZOO_ADMIN_KEY", None)
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockzoo.cli", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return wait_ready(ServerProcess(proc, f"http://127.0.0.1:{port}", log_path), "/ready", "server")


def wait_ready(
    server: ServerProcess, path: str, what: str, timeout_s: float = READY_TIMEOUT_S
) -> ServerProcess:
    """`server` once GET `path` answers 200; its log's tail in the error if it exits or never does."""
    proc = server.proc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = server.log_path.read_text()[-4000:]
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} never became ready")
