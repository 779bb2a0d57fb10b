"""The live server of the untrusted-input tests (one per test module) and the no-ERROR-logged check.

The tenant model `acme-bomb` is a full fine-tune whose tokenizer carries a chat template that renders
ordinary conversations but turns into a bomb when the last message names one. It is registered through
the zoo directly, as a template that passes the registration probes would be: render-time limits must
hold on their own. The server runs in the test process, so its log records reach `caplog`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.app import create_app
from router.auth import admin_key_digest
from router.inference import InferenceService
from router.jobs import build_jobs
from router.routes_health import router as health_router
from router.routes_models import models_router
from router.services import Services
from router.uploads import UploadLimits
from tests.router.live_server import serve
from tests.router.untrusted.helpers import CONDITIONAL_BOMB, MiB, with_template
from tests.zoo.zoo_helpers import add_tenant, open_zoo


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("untrusted")
    base = tiny_model_factory("llama", num_layers=2)
    zoo = open_zoo(root / "zoo")
    zoo.add_base("tiny-base", base)
    keys = {"acme": add_tenant(zoo, "acme")}
    zoo.register("acme", "acme-bomb", with_template(base, root / "bomb", CONDITIONAL_BOMB))
    settings = Settings(
        data_dir=root / "data",
        kv_cache_memory=16 << 20,
        max_model_len=256,
        page_size=8,
        max_sequences_per_request=8,
        # Longer than the /health bound, so a render on the event loop would show as a stall.
        chat_template_timeout_s=2.0,
    )
    inference = InferenceService(settings, zoo)
    jobs = build_jobs(settings, zoo)
    app = create_app(
        Services(settings, zoo, admin_key_digest("admin-secret")),
        inference,
        routers=[health_router, models_router([], UploadLimits(64 * MiB, 64 * MiB))],
        state={"jobs": jobs},
        on_shutdown=[jobs.shutdown],
    )
    with serve(app) as url:
        yield {"url": url, "keys": keys, "base": base, "root": root}


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The server runs in this process: nothing at ERROR (a traceback of a 500) may be logged."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
