"""Hostile input against `blockzoo serve` in its own process: what each attack costs the server.

For each attack (chat-template bombs in a tenant's tokenizer, multi-megabyte prompts and bodies, values
that used to give 500s) it prints the answer, how long the answer took, the slowest /health answer
while the attack ran (polled every 20 ms from another thread), and how far the server's peak RSS rose
(VmHWM, reset before each attack through /proc/<pid>/clear_refs).

    python -m benchmarks.hostile_input [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from blockzoo.zoo_factory import open_zoo
from zoo.catalog.tenants import create_tenant

MiB = 1 << 20
BOMB = (
    "{%- set last = messages[-1]['content'] -%}"
    "{%- if last == 'mul' -%}{% set s = 'x' * 400000000 %}{{ s }}"
    "{%- elif last == 'concat' -%}{% set ns = namespace(s='x' * 1000) %}"
    "{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    "{%- elif last == 'range' -%}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{%- elif last == 'output' -%}{% for i in range(100000) %}" + "y" * 4000 + "{% endfor %}"
    "{%- elif last == 'raise' -%}{{ raise_exception('no such conversation') }}"
    "{%- else -%}<|im_start|>user\n{{ last }}<|im_end|>\n<|im_start|>assistant\n{%- endif -%}"
)


def prepare(data_dir: Path) -> str:
    """A zoo with a tiny base and a tenant fine-tune whose chat template is a conditional bomb; the key."""
    zoo = open_zoo(Settings(data_dir=data_dir))
    base = TinyModelCache(data_dir / "tiny")("llama", num_layers=2)
    zoo.add_base("tiny-base", base)
    with zoo.sessions() as session, session.begin():
        _, key = create_tenant(session, "acme")
    bomb = data_dir / "bomb-model"
    shutil.copytree(base, bomb)
    (bomb / "chat_template.jinja").write_text(BOMB, encoding="utf-8")
    zoo.register("acme", "acme-bomb", bomb)
    return key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "BLOCKZOO_DATA_DIR": str(data_dir),
        "BLOCKZOO_LOG_LEVEL": "WARNING",
        "BLOCKZOO_MAX_MODEL_LEN": "256",
        "BLOCKZOO_KV_CACHE_MEMORY": str(16 * MiB),
    }
    log = (data_dir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockzoo.cli", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((data_dir / "server.log").read_text()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server never answered /health")


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(
    url: str, pid: int, attack: Callable[[], httpx.Response]
) -> tuple[httpx.Response, float, float, float]:
    """The response, seconds to answer, slowest /health answer meanwhile, peak RSS growth (MiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _status(pid, "VmRSS")
    worst = 0.0
    stop = threading.Event()

    def poll() -> None:
        nonlocal worst
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                t = time.monotonic()
                ok = http.get(url + "/health").status_code == 200
                worst = max(worst, time.monotonic() - t if ok else float("inf"))
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start_t = time.monotonic()
    response = attack()
    elapsed = time.monotonic() - start_t
    time.sleep(0.1)
    stop.set()
    poller.join(timeout=30)
    return response, elapsed, worst, (_status(pid, "VmHWM") - before) / MiB


def attacks(url: str, key: str, quick: bool) -> dict[str, Callable[[], httpx.Response]]:
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}

    def post(path: str, body: str | bytes) -> Callable[[], httpx.Response]:
        data = body.encode() if isinstance(body, str) else body  # UTF-8, as clients send it
        return lambda: httpx.post(url + path, content=data, headers=headers, timeout=120)

    def chat(content: str, model: str = "acme-bomb") -> Callable[[], httpx.Response]:
        return post(
            "/v1/chat/completions",
            json.dumps(
                {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2},
                ensure_ascii=False,
            ),
        )

    big = ("The zoo keeps many blocks, émoji 🙂. " * 100_000)[: 3 * MiB]
    out = {
        f"template bomb: {v}": chat(v)
        for v in (("mul", "range") if quick else ("mul", "concat", "range", "output"))
    }
    out["template raise_exception"] = chat("raise")
    out["3 MB completion prompt"] = post(
        "/v1/completions",
        json.dumps({"model": "tiny-base", "prompt": big, "max_tokens": 2}, ensure_ascii=False),
    )
    out["3 MB chat message"] = chat(big, "tiny-base")
    out["1.8M token ids (3.6 MB)"] = post(
        "/v1/completions",
        json.dumps({"model": "tiny-base", "prompt": [1] * 1_800_000}, separators=(",", ":")),
    )
    out["5 MB body"] = post("/v1/completions", json.dumps({"model": "tiny-base", "prompt": "x" * (5 * MiB)}))
    out["lone surrogate prompt"] = post("/v1/completions", '{"model": "tiny-base", "prompt": "\\ud800"}')
    out["NaN temperature"] = post(
        "/v1/completions", '{"model": "tiny-base", "prompt": "a", "temperature": NaN}'
    )
    out["100k-deep JSON"] = post(
        "/v1/completions", '{"model": "tiny-base", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    out["tools (unsupported)"] = post(
        "/v1/chat/completions",
        '{"model": "tiny-base", "messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}',
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two template bombs instead of four")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="bz-hostile-"))
    try:
        key = prepare(data_dir)
        proc, url = start(data_dir)
        try:
            # Load both models first, so that loading is not counted as an attack's memory.
            for model in ("acme-bomb", "tiny-base"):
                warm = httpx.post(
                    url + "/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": "hello"}],
                        "max_tokens": 2,
                    },
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=120,
                )
                warm.raise_for_status()
            rows = []
            for name, attack in attacks(url, key, args.quick).items():
                response, elapsed, worst, growth = measure(url, proc.pid, attack)
                code = response.json().get("error", {}).get("code") if response.status_code >= 400 else "-"
                rows.append((name, response.status_code, code, elapsed, worst, growth))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print("| attack | status | code | answered in s | slowest /health s | peak RSS growth MiB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, status, code, elapsed, worst, growth in rows:
            print(f"| {name} | {status} | {code} | {elapsed:.2f} | {worst:.3f} | {growth:.1f} |")
        five_hundreds = sum(1 for r in rows if r[1] >= 500)
        print(
            f"headline: attacks={len(rows)} 5xx={five_hundreds} slowest_health_s={max(r[4] for r in rows):.3f} "
            f"max_rss_growth_mib={max(r[5] for r in rows):.1f}"
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
