"""Schemathesis fuzzing of the whole server, in process, over its own OpenAPI schema: no request may get a 5xx.

The app is the real one (`build_server`) over a SQLite data dir with the demo zoo, so tenant routes see
real models. Every operation gets a small, seeded budget of positive and negative cases; generated
bodies for the inference routes are steered towards real model names and capped at a few output tokens,
so the run exercises the engine without being slow. Every operation runs even after another failed, so
one broken route does not hide the others; each failure carries a curl line to reproduce it and the
server's own log with its traceback.

An unhandled exception fails the run either way: the app answers 500 (`not_a_server_error`) and
Starlette re-raises it into the in-process transport, which raises it here; that also covers a stream
that breaks after its 200 headers went out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import response_schema_conformance

from blockzoo.demo_zoo import ensure_demo_zoo
from blockzoo.settings import Settings
from router.server import build_server

ADMIN_KEY = "fuzz-admin"
TENANT = "demo-alice"
MAX_EXAMPLES = 15
# The inference routes get more: most generated bodies are rejected before they reach the engine.
INFERENCE_EXAMPLES = 60
# The app has 32 operations; far fewer means the schema did not load as expected.
MIN_OPERATIONS = 30
CHECKS = [not_a_server_error, response_schema_conformance]
MAX_OUTPUT_TOKENS = 4
# Alice's own models, the shared base, and one of Bob's (which Alice must get a 404 for).
MODEL_NAMES = ("demo-base", "alice-support", "alice-sql", "bob-legal")
TENANT_NAMES = (TENANT, "demo-bob")
PATH_NAME_KEYS = ("model_name", "name")
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")
# Below the demo base's vocabulary size, so wrapped token ids are valid prompts.
VOCAB_FLOOR = 256
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")
Operation = APIOperation[Any, Any, Any, Any]
TRACEBACK_MARKER = "Traceback (most recent call last)"
REQUEST_TIMEOUT_S = 30


class ServerLog(logging.Handler):
    """Collects what the server logs at ERROR and above (tracebacks included) between two requests."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def take(self) -> str:
        text, self.lines = "\n".join(self.lines), []
        return text


@dataclass
class FuzzServer:
    """The app under test, the keys to call it with, and its error log."""

    app: Any
    tenant_key: str
    log: ServerLog = field(default_factory=ServerLog)

    def auth_headers(self, path: str) -> dict[str, str]:
        key = ADMIN_KEY if path.startswith("/admin/") else self.tenant_key
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        admin_key=ADMIN_KEY,
        kv_cache_memory=8 << 20,
        max_model_len=128,
        register_paths=[],
    )
    built = build_server(settings)
    keys = ensure_demo_zoo(settings, built.app.state.services.zoo)
    server = FuzzServer(built.app, keys[TENANT])
    root = logging.getLogger()
    root.addHandler(server.log)
    try:
        yield server
    finally:
        root.removeHandler(server.log)
        # Schemathesis started the app's lifespan on its first request; this runs its shutdown hooks.
        shutdown_lifespans()


def _in_vocab(prompt: Any) -> Any:
    """Token-id prompts wrapped into the vocabulary; other prompts unchanged."""
    if isinstance(prompt, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [abs(p) % VOCAB_FLOOR for p in prompt]
    if isinstance(prompt, list) and all(isinstance(p, list) for p in prompt):
        return [_in_vocab(p) for p in prompt]
    return prompt


def _steer(body: dict[str, Any], model: str, stream: bool, tidy: bool) -> dict[str, Any]:
    steered = {**body, "model": model, "stream": stream}
    if tidy:
        steered.pop("suffix", None)
        if "prompt" in steered:
            steered["prompt"] = _in_vocab(steered["prompt"])
    return steered


def _steer_body(context: schemathesis.HookContext, body: Any) -> Any:
    """Inference bodies: often a real model name and a prompt it can take, sometimes streamed, and
    never more than a few output tokens; the generated body itself stays among the choices."""
    operation = context.operation
    if operation is None or operation.path not in INFERENCE_PATHS or not isinstance(body, dict):
        return st.just(body)
    capped = dict(body)
    for name in TOKEN_FIELDS:
        value = capped.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_OUTPUT_TOKENS:
            capped[name] = MAX_OUTPUT_TOKENS
    if "model" not in capped:
        return st.just(capped)
    models = st.sampled_from([capped["model"], *MODEL_NAMES])
    streams = st.sampled_from([capped.get("stream", False), True])
    return st.builds(_steer, st.just(capped), models, streams, st.booleans())


def _steer_path(context: schemathesis.HookContext, params: dict[str, Any] | None) -> Any:
    """Reads by name also ask for real models or tenants; deletes keep random names so the zoo stays intact."""
    operation = context.operation
    key = next((k for k in PATH_NAME_KEYS if k in (params or {})), None)
    if operation is None or params is None or key is None or operation.method.upper() != "GET":
        return st.just(params)
    real = TENANT_NAMES if operation.path.startswith("/admin/") else MODEL_NAMES
    return st.sampled_from([params, *({**params, key: n} for n in real)])


def _operations(server: FuzzServer) -> list[Operation]:
    # An explicit config, so a schemathesis.toml lying around cannot change this test. Sanitizing is off:
    # it would print "max_tokens": "[Filtered]" (any key with "token" in it) in the reproduction.
    config = schemathesis.Config.from_dict(
        {"request-timeout": REQUEST_TIMEOUT_S, "output": {"sanitization": {"enabled": False}}}
    )
    loaded = schemathesis.openapi.from_asgi("/openapi.json", server.app, config=config)
    loaded.hook("flatmap_body")(_steer_body)
    loaded.hook("flatmap_path_parameters")(_steer_path)
    operations = []
    for result in loaded.get_all_operations():
        if not isinstance(result, Ok):
            raise AssertionError(f"schemathesis cannot use the app's schema: {result.err()}")
        operations.append(result.ok())
    return operations


# Driven by hand rather than by schemathesis.pytest.from_fixture(...).parametrize(): that wrapper sets
# `request.node._nodeid`, which pytest 9.2 no longer has ("'Function' object has no attribute '_nodeid'").
def _fuzz(operation: Operation, server: FuzzServer) -> None:
    """Seeded positive and negative cases for one operation; raises on the first bad response."""
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )
    headers = server.auth_headers(operation.path)

    @settings(
        max_examples=INFERENCE_EXAMPLES if operation.path in INFERENCE_PATHS else MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        print_blob=False,
    )
    @given(case=strategy)
    def check(case: Case[Operation]) -> None:
        server.log.take()
        try:
            response = case.call_and_validate(headers=headers, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:
            exc.add_note(f"server log:\n{server.log.take() or '(nothing logged)'}")
            raise
        if TRACEBACK_MARKER in response.text:
            raise AssertionError(
                f"the response leaks a stack trace:\n{response.text[:2000]}\n"
                f"Reproduce with:\n{case.as_curl_command(headers)}"
            )

    check()


def test_no_server_errors(fuzz_server: FuzzServer) -> None:
    operations = _operations(fuzz_server)
    assert len(operations) >= MIN_OPERATIONS, [op.label for op in operations]
    failures = []
    # Every operation runs even after one fails, so a report lists every broken route at once.
    # Schemathesis reports failed checks as a FailureGroup, a BaseExceptionGroup rather than an Exception.
    for operation in operations:
        try:
            _fuzz(operation, fuzz_server)
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label}: {_describe(exc)}")
    assert not failures, "\n\n".join(failures)


def _describe(exc: BaseException) -> str:
    """The error with its notes; for a group (e.g. Hypothesis' flaky failure), each member too."""
    lines = [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])]
    if isinstance(exc, BaseExceptionGroup):
        lines += [_describe(inner) for inner in exc.exceptions]
    return "\n".join(lines)
