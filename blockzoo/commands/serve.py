"""`blockzoo serve`: the API server (FastAPI on uvicorn) with the engine in the same process."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from typing import Any

import uvicorn

from blockzoo.demo_zoo import BASE, DEMO_MODELS, ensure_demo_zoo
from blockzoo.logging_setup import configure_logging
from blockzoo.settings import Settings
from router.drain import DrainingServer, EarlySignals
from router.server import build_server


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("serve", help="Run the OpenAI-compatible API server.")
    p.add_argument("--host", default=None, help="interface to bind (default: BLOCKZOO_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default: BLOCKZOO_PORT)")
    p.add_argument("--demo", action="store_true", help="build the demo zoo first if this data dir has none")
    p.add_argument(
        "--weights-memory",
        type=parse_bytes,
        default=None,
        metavar="SIZE",
        help="budget of resident block weights, e.g. 512MiB or 2GB (default: BLOCKZOO_WEIGHTS_MEMORY)",
    )
    p.add_argument(
        "--weights-quantization",
        default=None,
        metavar="LABEL",
        help="serve blocks on their 4-bit variants of this label, e.g. w4a16-g128-gptq "
        "(default: BLOCKZOO_WEIGHTS_QUANTIZATION)",
    )
    p.set_defaults(handler=run)


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def parse_bytes(text: str) -> int:
    """`"512MiB"`, `"2GB"`, `"1048576"` → bytes; argparse turns the ValueError into a usage error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 2GB or a number of bytes)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The environment's settings with this command line's overrides on top."""
    updates: dict[str, Any] = {}
    if args.weights_memory is not None:
        updates["weights_memory"] = args.weights_memory
    if args.weights_quantization is not None:
        updates["weights_quantization"] = args.weights_quantization
    # Keyword arguments win over the environment and are validated like it.
    return Settings(**updates)


DEMO_QUESTION = "What is the capital of France?"


def curl_example(host: str, port: int, key: str, model: str, question: str = DEMO_QUESTION) -> str:
    """A chat completion with greedy decoding, so the answer printed is the model's own best guess."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    return (
        f"curl -s http://{host}:{port}/v1/chat/completions "
        f"-H {shlex.quote('Authorization: Bearer ' + key)} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def print_demo_examples(host: str, port: int, keys: dict[str, str], data_dir: str) -> None:
    first = DEMO_MODELS[0].tenant
    print(f"Ask the base, {BASE} (every tenant sees it):")
    print("  " + curl_example(host, port, keys[first], BASE))
    print("Ask the demo tenants' fine-tunes the same question:")
    for model in DEMO_MODELS:
        print(f"  # {model.tenant}/{model.name}: {model.learned}")
        print("  " + curl_example(host, port, keys[model.tenant], model.name))
    print(f"Demo tenant keys are in {data_dir}/demo_keys.json")


def run(args: argparse.Namespace) -> int:
    early = EarlySignals()
    early.install()
    settings = settings_from_args(args)
    host = args.host or settings.host
    port = args.port or settings.port
    built = build_server(settings)
    keys = ensure_demo_zoo(settings, built.inference.zoo) if args.demo else {}
    print(f"BlockZoo serving on http://{host}:{port}  (data: {settings.data_dir.resolve()})")
    if built.new_admin_key is not None:
        print(f"Admin key (shown once, only its hash is kept): {built.new_admin_key}")
    print(f"Admin API: http://{host}:{port}/admin/v1  (the admin web UI is not built yet)")
    if keys:
        print_demo_examples(host, port, keys, str(settings.data_dir))
    configure_logging(settings.log_level, settings.log_json)
    config = uvicorn.Config(
        built.app, host=host, port=port, log_level=settings.log_level.lower(), log_config=None
    )
    server = DrainingServer(config, built.app.state.drain, settings.drain_timeout_s, early)
    server.run()
    # uvicorn.run's rule: a server that never started (port taken, startup failed) is a failure.
    return 0 if server.started else 3
