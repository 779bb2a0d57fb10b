"""A SIGINT/SIGTERM that arrives while the server is still being built (engine, demo zoo) stops it as
soon as it starts; it used to be lost, and the server ran on."""

from __future__ import annotations

import os
import signal
import time

import pytest
import uvicorn
from fastapi import FastAPI

from router.drain import Drain, DrainingServer, EarlySignals

pytestmark = pytest.mark.timeout(60)


def test_a_signal_before_startup_drains_the_server_once_it_starts() -> None:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    early = EarlySignals()
    try:
        early.install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode boundary
        assert early.received == signal.SIGINT  # recorded, no KeyboardInterrupt
        config = uvicorn.Config(FastAPI(), host="127.0.0.1", port=0, log_config=None, lifespan="off")
        server = DrainingServer(config, Drain(), timeout_s=30.0, early=early)
        started = time.monotonic()
        server.run()  # without the early signal this would serve until the test's timeout
        assert server.started
        assert time.monotonic() - started < 20
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
