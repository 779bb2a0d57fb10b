"""Chat templates rendered as tenant data: in a bounded sandbox, with the globals transformers provides.

`ChatTemplates.render` gives the same text as `tokenizer.apply_chat_template(..., tokenize=False)` for
real templates (ChatML, Llama-3, Qwen2/3, SmolLM2: see tests/zoo/test_chat_template.py), but every
render is limited in time, output and value size (zoo/template_sandbox.py). `validate_template`
is the registration-time check: a template must compile and render probe conversations within limits.

It lives in the zoo because a template is registered content: the zoo checks it when a model (a GGUF
file's metadata, say) is registered, and the router renders it per request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.utils import Namespace

from zoo.template_sandbox import LimitedSandbox, RenderLimits, TemplateLimitError, bounded_render

# ChatML: what most chat models expect when a tokenizer ships no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Compiling ends in one call to Python's compile(), which holds the GIL throughout: measured on a loaded
# 2-core machine, 14k characters held it 0.08 s, 32k 0.15 s, 64k 0.39 s, 250k 1.7 s. Real templates are
# under 20k characters.
MAX_TEMPLATE_CHARS = 64 * 1024
_MESSAGE_CHARS = 300

ErrorKind = Literal["limit", "raised", "invalid"]


class ChatTemplateError(Exception):
    """A template that broke a limit ("limit"), refused the conversation through raise_exception
    ("raised"), or cannot render at all ("invalid")."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _TemplateRaised(jinja2.TemplateError):
    """raise_exception() was called by the template."""


def _raise_exception(message: object) -> None:
    raise _TemplateRaised(str(message)[:_MESSAGE_CHARS])


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: no HTML escaping (Jinja's own filter escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise TemplateLimitError("strftime_now takes a format of at most 256 characters")
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (as transformers does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """Jinja's namespace, refusing underscore-prefixed names (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot store {name!r} on a namespace")


class _Generation(Extension):
    """transformers' `{% generation %}` tag: marks assistant text for training masks; renders its body."""

    tags = {"generation"}  # noqa: RUF012 (Jinja declares tags as a plain class attribute)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _environment() -> LimitedSandbox:
    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.add_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template text (its 'default' one when it has several), else ChatML."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    return template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE


def _plain(value: Any) -> Any:
    # Only JSON-shaped data reaches a template: no object with methods the sandbox doesn't know about.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


class ChatTemplates:
    """Compiles templates once (a small LRU keyed by their text) and renders them within `limits`.

    Blocking and CPU-bound: call `render` from a worker thread, never on the event loop."""

    def __init__(
        self, limits: RenderLimits, max_template_chars: int = MAX_TEMPLATE_CHARS, cache_size: int = 64
    ) -> None:
        self.limits = limits
        self.max_template_chars = max_template_chars
        self.cache_size = cache_size
        self._env = _environment()
        self._compiled: OrderedDict[str, jinja2.Template] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, source: str) -> jinja2.Template:
        """The compiled template; ChatTemplateError('invalid') for a template that is too long or malformed."""
        with self._lock:
            compiled = self._compiled.get(source)
            if compiled is not None:
                self._compiled.move_to_end(source)
                return compiled
        if len(source) > self.max_template_chars:
            raise ChatTemplateError(
                "invalid", f"the chat template is longer than {self.max_template_chars} characters"
            )
        try:
            compiled = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                "invalid", f"the chat template has a syntax error: {exc.message}"
            ) from None
        except (jinja2.TemplateError, RecursionError, MemoryError, SyntaxError, ValueError) as exc:
            raise ChatTemplateError(
                "invalid", f"the chat template cannot be compiled: {_short(exc)}"
            ) from None
        with self._lock:
            self._compiled[source] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def render(
        self,
        source: str,
        messages: Sequence[Mapping[str, Any]],
        special_tokens: Mapping[str, Any],
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text, as apply_chat_template(tokenize=False) renders it; ChatTemplateError otherwise."""
        compiled = self.compile(source)
        context = {
            **_plain(dict(special_tokens)),
            "messages": _plain(list(messages)),
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return bounded_render(lambda: compiled.render(context), self.limits)
        except TemplateLimitError as exc:
            raise ChatTemplateError("limit", str(exc)) from None
        except _TemplateRaised as exc:
            raise ChatTemplateError("raised", f"the chat template refused the conversation: {exc}") from None
        except RecursionError:
            raise ChatTemplateError("limit", "the chat template recursed too deeply") from None
        except MemoryError:
            raise ChatTemplateError("limit", "the chat template ran out of memory") from None
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            ArithmeticError,
            LookupError,
            AttributeError,
        ) as exc:
            raise ChatTemplateError("invalid", f"the chat template failed: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:_MESSAGE_CHARS]}"


_PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello!"},),
    (
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
    ),
)
_PROBE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def validate_template(source: str, limits: RenderLimits | None = None) -> None:
    """Refuse a template that is malformed or breaks a limit on ordinary conversations
    (ChatTemplateError). A template that only refuses a probe through raise_exception passes:
    templates rightly refuse conversations they do not support."""
    templates = ChatTemplates(limits or RenderLimits(), cache_size=1)
    for probe in _PROBES:
        for generation_prompt in (True, False):
            try:
                templates.render(source, probe, _PROBE_TOKENS, generation_prompt)
            except ChatTemplateError as exc:
                if exc.kind != "raised":
                    raise


def templates_in_folder(folder: Path) -> list[tuple[str, str | None]]:
    """(file name, template text) for every chat template a tokenizer folder carries, in the places
    transformers reads them from; None for a template file that is not UTF-8 text. JSON files that do
    not parse are skipped: the JSON checks of the upload report them."""
    found: list[tuple[str, str | None]] = []
    extra = folder / "additional_chat_templates"
    jinja_files = [folder / "chat_template.jinja", *(sorted(extra.glob("*.jinja")) if extra.is_dir() else [])]
    for jinja_file in jinja_files:
        if not jinja_file.is_file():
            continue
        label = str(jinja_file.relative_to(folder))
        try:
            found.append((label, jinja_file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            found.append((label, None))
    for name, key in (("tokenizer_config.json", "chat_template"), ("chat_template.json", "chat_template")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, str):
            found.append((name, value))
        elif isinstance(value, list):
            found.extend(
                (name, item["template"])
                for item in value
                if isinstance(item, dict) and isinstance(item.get("template"), str)
            )
    return found
