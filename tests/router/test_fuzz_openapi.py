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

import itertools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import response_schema_conformance

from blockzoo.settings import Settings
from blockzoo.tiny_demo_zoo import BASE as DEMO_BASE
from blockzoo.tiny_demo_zoo import ensure_demo_zoo, write_lora_adapter
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
FROM_PATH = "/v1/fine-tunes/from-path"
TENANTS = "/admin/v1/tenants"
_NAMES = itertools.count()
# Below the demo base's vocabulary size, so wrapped token ids are valid prompts.
VOCAB_FLOOR = 256
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")
Operation = APIOperation[Any, Any, Any, Any]
TRACEBACK_MARKER = "Traceback (most recent call last)"
REQUEST_TIMEOUT_S = 30
# Stateful: scenarios of a few linked calls each, enough to walk every link while staying fast.
STATEFUL_EXAMPLES = 80
STATEFUL_STEPS = 6
# Explicit links (registrations to their jobs) plus those inferred from the schema (tenants, keys, jobs).
MIN_LINKS = 20


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
    # A LoRA adapter folder for the demo base under the allowed roots: from-path bodies may name it.
    adapter_dir: str
    log: ServerLog = field(default_factory=ServerLog)

    def auth_headers(self, path: str) -> dict[str, str]:
        key = ADMIN_KEY if path.startswith("/admin/") else self.tenant_key
        return {"Authorization": f"Bearer {key}"}


@contextmanager
def _fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    roots = tmp_path_factory.mktemp("roots")
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        admin_key=ADMIN_KEY,
        kv_cache_memory=8 << 20,
        max_model_len=128,
        register_paths=[roots],
    )
    built = build_server(settings)
    zoo = built.app.state.services.zoo
    keys = ensure_demo_zoo(settings, zoo)
    base_config = roots / "base-config"
    base_config.mkdir()
    (base_config / "config.json").write_text(json.dumps(zoo.resolve(None, DEMO_BASE).raw_config))
    adapter = write_lora_adapter(base_config, roots / "adapter", rank=4, targets=["q_proj"], seed=1)
    server = FuzzServer(built.app, keys[TENANT], str(adapter))
    root = logging.getLogger()
    root.addHandler(server.log)
    try:
        yield server
    finally:
        root.removeHandler(server.log)
        # Schemathesis started the app's lifespan on its first request; this runs its shutdown hooks.
        # (Its pytest plugin also ends every lifespan after each test: hence one server per test.)
        shutdown_lifespans()


@pytest.fixture
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    with _fuzz_server(tmp_path_factory) as server:
        yield server


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


def _fresh(path: str, adapter_dir: str = "") -> st.SearchStrategy[dict[str, Any]]:
    """A body that creates something new each time it is drawn: a name never used before (drawn by a
    counter, not by Hypothesis, so that replaying a scenario cannot collide with what it created)."""

    def body(_: None) -> dict[str, Any]:
        name = f"fuzz-{next(_NAMES)}"
        return {"name": name, "path": adapter_dir} if path == FROM_PATH else {"name": name}

    return st.builds(body, st.none())


def _steer_body(context: schemathesis.HookContext, body: Any, adapter_dir: str = "") -> Any:
    """Inference bodies: often a real model name and a prompt it can take, sometimes streamed, and
    never more than a few output tokens; the generated body itself stays among the choices."""
    operation = context.operation
    if operation is not None and operation.path == FROM_PATH and isinstance(body, dict) and adapter_dir:
        # Mostly a real adapter folder, so that registrations start jobs for the stateful links to follow.
        return st.one_of(st.just(body), _fresh(FROM_PATH, adapter_dir))
    if operation is not None and operation.path == TENANTS and operation.method.upper() == "POST":
        return st.one_of(st.just(body), _fresh(TENANTS))
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


def _schema(server: FuzzServer) -> Any:
    # An explicit config, so a schemathesis.toml lying around cannot change this test. Sanitizing is off:
    # it would print "max_tokens": "[Filtered]" (any key with "token" in it) in the reproduction.
    config = schemathesis.Config.from_dict(
        {"request-timeout": REQUEST_TIMEOUT_S, "output": {"sanitization": {"enabled": False}}}
    )
    loaded = schemathesis.openapi.from_asgi("/openapi.json", server.app, config=config)

    def steer_body(context: schemathesis.HookContext, body: Any) -> Any:
        return _steer_body(context, body, server.adapter_dir)

    loaded.hook("flatmap_body")(steer_body)
    loaded.hook("flatmap_path_parameters")(_steer_path)
    return loaded


def _operations(server: FuzzServer) -> list[Operation]:
    loaded = _schema(server)
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


def test_stateful_sequences_get_no_server_errors(fuzz_server: FuzzServer) -> None:
    """Sequences of calls chained by the schema's links (explicit ones, e.g. a registration's 202 to
    its job, and those schemathesis infers, e.g. a created tenant to its reads, patches and deletes)."""
    server = fuzz_server
    machine = _schema(server).as_state_machine()
    assert machine.schema.statistic.transitions.total >= MIN_LINKS, machine.schema.statistic.transitions

    class Workflow(machine):  # type: ignore[misc, valid-type]
        def before_call(self, case: Case[Operation]) -> None:
            server.log.take()
            # The tenant key the tenant routes run with stays valid: revoke the other tenant's keys.
            params = case.path_parameters
            if params is not None and params.get("name") == TENANT and case.method.upper() == "DELETE":
                params["name"] = TENANT_NAMES[1]

        def get_call_kwargs(self, case: Case[Operation]) -> dict[str, Any]:
            return {"headers": server.auth_headers(case.path)}

        def validate_response(
            self, response: Any, case: Case[Operation], additional_checks: Any = None, **kwargs: Any
        ) -> None:
            try:
                case.validate_response(response, checks=[not_a_server_error], transport_kwargs=kwargs or None)
            except (Exception, BaseExceptionGroup) as exc:
                exc.add_note(f"server log:\n{server.log.take() or '(nothing logged)'}")
                raise
            if TRACEBACK_MARKER in response.text:
                raise AssertionError(f"the response leaks a stack trace:\n{response.text[:2000]}")

    Workflow.run(
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            print_blob=False,
            suppress_health_check=list(HealthCheck),
        )
    )


def _describe(exc: BaseException) -> str:
    """The error with its notes; for a group (e.g. Hypothesis' flaky failure), each member too."""
    lines = [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])]
    if isinstance(exc, BaseExceptionGroup):
        lines += [_describe(inner) for inner in exc.exceptions]
    return "\n".join(lines)
