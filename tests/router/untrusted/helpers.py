"""What the untrusted-input tests measure the live server with, and the chat templates it serves.

The server runs in the test process, so its memory is this process's (/proc/self).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

BOMB_CHARS = 400_000_000
CONDITIONAL_BOMB = (
    "{%- set last = messages[-1]['content'] -%}"
    "{%- if last == 'mul' -%}{% set s = 'x' * " + str(BOMB_CHARS) + " %}{{ s }}"
    "{%- elif last == 'concat' -%}{% set ns = namespace(s='x' * 1000) %}"
    "{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    "{%- elif last == 'range' -%}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{%- elif last == 'output' -%}{% for i in range(100000) %}" + "y" * 4000 + "{% endfor %}"
    "{%- elif last == 'raise' -%}{{ raise_exception('this model takes no such conversation') }}"
    "{%- else -%}<|im_start|>user\n{{ last }}<|im_end|>\n<|im_start|>assistant\n{%- endif -%}"
)
OBVIOUS_BOMB = "{% set s = 'x' * 400000000 %}{{ s }}"
MiB = 1 << 20


def with_template(base: Path, out: Path, template: str) -> Path:
    shutil.copytree(base, out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def client(live: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live["url"] + "/v1", api_key=live["keys"]["acme"], max_retries=0, timeout=60
    )


def raw_post(live: dict[str, Any], path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        live["url"] + path,
        content=body,
        headers={
            "Authorization": f"Bearer {live['keys']['acme']}",
            "content-type": "application/json",
            **headers,
        },
        timeout=60,
    )


class HealthWatch:
    """Polls /health from another thread; `worst` is the slowest answer seen (inf if one failed)."""

    def __init__(self, url: str) -> None:
        self.url = url + "/health"
        self.worst = 0.0
        self.polls = 0
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    ok = http.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.monotonic() - start if ok else float("inf"))
                self.polls += 1
                self._first.set()
                time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        # The watch is live before the attack starts: a fast answer cannot leave it with no poll.
        self._first.wait(timeout=15)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def rss_peak_reset() -> None:
    # Writing 5 to clear_refs resets VmHWM, so the peak read afterwards is this test's alone.
    Path("/proc/self/clear_refs").write_text("5")


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def assert_error(
    exc: openai.APIStatusError | httpx.Response, status: int, code: str, param: str | None
) -> str:
    response = exc.response if isinstance(exc, openai.APIStatusError) else exc
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert "Traceback" not in error["message"] and "/work" not in error["message"]
    return str(error["message"])
