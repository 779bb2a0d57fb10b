"""A Jinja sandbox whose renders are bounded in time, output and the size of every value they build.

Jinja's `ImmutableSandboxedEnvironment` stops a template from reaching Python internals, but not from
building `'x' * 10**9` or looping for an hour. Chat templates are tenant data, so every place where a
render can spend memory or time passes a check here:

- binary operators (`+ * ** %` …) are intercepted (`intercepted_binops`) and refused *before* they would
  build a value over the limit;
- every call (methods, globals, macros, `loop(...)`) and every filter is checked before (argument sizes,
  the few methods whose output multiplies their input) and after (result size);
- the template's syntax tree is rewritten before code generation so that every `for` iterates through
  a guard that checks the deadline, `~` concatenations are size-checked, and literal template text is
  charged like `{{ }}` output: every piece of output, captured (macros, `{% set %}` blocks) or not,
  counts against one budget, so a joined buffer can never exceed it.

The budget of the render in progress lives in a context variable, set by `bounded_render` for the
thread doing the render, so compiled templates can be shared between concurrent renders.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

# Integers a template may build: far above any index or count a chat template needs.
MAX_INT_BITS = 4096
# `range`, `center(width)`, `batch(n)` …: the largest count a template may ask for in one call.
MAX_COUNT_ARG = 100_000
MAX_JSON_INDENT = 64
MAX_STRFTIME_FORMAT = 256
_DIGIT_RUN = re.compile(r"\d+")


class TemplateLimitError(TemplateError):
    """A render went over one of its limits (time, output or value size)."""


@dataclass(frozen=True)
class RenderLimits:
    """What one render may spend: wall time, characters of output (all output, captured or not),
    and the size of any single value it builds (characters, plus one per container element)."""

    timeout_s: float = 1.0
    max_output_chars: int = 1_000_000
    max_value_chars: int = 1_000_000


class _Budget:
    """The spending of one render in progress."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout_s
        self.output = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"the chat template ran past its time limit of {self.limits.timeout_s:g} s"
            )

    def charge(self, chars: int) -> None:
        self.output += chars
        if self.output > self.limits.max_output_chars:
            raise TemplateLimitError(
                f"the chat template produced more than {self.limits.max_output_chars} characters"
            )
        self.tick()

    def check_value(self, value: Any, what: str) -> None:
        limit = self.limits.max_value_chars
        if size_of(value, limit) > limit:
            raise TemplateLimitError(f"the chat template built a value over {limit} characters ({what})")

    def check_size(self, size: int, what: str) -> None:
        if size > self.limits.max_value_chars:
            raise TemplateLimitError(
                f"the chat template tried to build a value over {self.limits.max_value_chars} characters ({what})"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # a hook ran outside bounded_render: fail closed
        raise TemplateLimitError("chat templates render only within limits")
    return budget


def size_of(value: Any, cap: int) -> int:
    """Characters in `value`, plus one per container element; stops counting once past `cap`.

    Every element visited adds at least one, so the walk takes at most `cap + 1` steps even over
    structures that repeat references to the same big value."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item) + 1
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, Mapping):
            total += 1
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 1
            stack.extend(item)
        else:
            total += 1
        if total > cap:
            return cap + 1
    return total


def _check_args(budget: _Budget, args: tuple[Any, ...], kwargs: Mapping[str, Any], what: str) -> None:
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_COUNT_ARG:
            raise TemplateLimitError(f"the chat template passed {what} a number over {MAX_COUNT_ARG}")
        budget.check_value(arg, what)


def _check_subject(budget: _Budget, value: Any, what: str) -> None:
    budget.check_value(value, what)


def _check_format_string(text: str, what: str) -> None:
    # Widths and precisions in a format string ('%0999999999d', '{:>999999999}') size the result.
    if any(int(run) > MAX_COUNT_ARG for run in _DIGIT_RUN.findall(text) if len(run) < 12) or any(
        len(run) >= 12 for run in _DIGIT_RUN.findall(text)
    ):
        raise TemplateLimitError(f"the chat template used a width over {MAX_COUNT_ARG} in {what}")
    if "%*" in text or ".*" in text:
        raise TemplateLimitError(f"the chat template used a '*' width in {what}")


def _result_size(budget: _Budget, name: str, subject: Any, args: tuple[Any, ...]) -> int | None:
    """An upper bound on the size of `subject.name(*args)` for the str methods and filters whose output
    can be many times their input; None when the output is bounded by the input anyway."""
    if not isinstance(subject, str):
        subject_size = size_of(subject, budget.limits.max_value_chars)
        if name == "join" and args and isinstance(args[0], str):
            return subject_size * (len(args[0]) + 1)
        return None
    n = len(subject)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = n + 1 if not args[0] else subject.count(args[0])
        return n + hits * len(args[1])
    if name == "expandtabs":
        width = args[0] if args and isinstance(args[0], int) else 8
        return n + subject.count("\t") * max(width, 0)
    if name == "indent":
        width = args[0] if args and isinstance(args[0], int) else 4
        pad = width if isinstance(width, int) else len(str(width))
        return n + (subject.count("\n") + 1) * max(pad, 0)
    if name == "join" and args:
        return size_of(args[0], budget.limits.max_value_chars) * (n + 1)
    if name in ("format", "format_map"):
        _check_format_string(subject, name)
    return None


class _Guard(NodeTransformer):
    """Rewrites a template's syntax tree so loops, concatenations and literal text are accounted for."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "bz_loop", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, "bz_sized", [], [], None, None, lineno=node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            nodes.Filter(child, "bz_text", [], [], None, None, lineno=child.lineno)
            if isinstance(child, nodes.TemplateData)
            else child
            for child in node.nodes
        ]
        return node


class _GuardedCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        _Guard().visit(node)
        super().visit_Template(node, frame)


@pass_context
def _loop_guard(_: Context, iterable: Any) -> Iterator[Any]:
    budget = _budget()
    budget.tick()
    for item in iterable:
        budget.tick()
        yield item


@pass_context
def _sized(_: Context, value: str) -> str:
    budget = _budget()
    budget.check_value(value, "~ concatenation")
    budget.tick()
    return value


@pass_context
def _text(_: Context, value: str) -> str:
    # Only a context filter is not folded at compile time: wrapped in one, literal text reaches
    # `_finalize` at run time and is charged there like any {{ }} output.
    return value


@pass_context
def _finalize(_: Context, value: Any) -> str:
    budget = _budget()
    if isinstance(value, str):
        budget.charge(len(value))
        return value
    # repr of a container can be up to ten characters per character (escapes) plus separators.
    budget.check_size(size_of(value, budget.limits.max_output_chars) * 10, "output of a value")
    text = str(value)
    budget.charge(len(text))
    return text


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        _check_subject(budget, value, f"the filter {name!r}")
        _check_args(budget, args, kwargs, f"the filter {name!r}")
        bound = _result_size(budget, name, value, args)
        if bound is not None:
            budget.check_size(bound, f"the filter {name!r}")
        if name == "format" and isinstance(value, str):
            _check_format_string(value, "the filter 'format'")
        if name == "tojson" and int(kwargs.get("indent") or 0) > MAX_JSON_INDENT:
            raise TemplateLimitError(f"the chat template asked tojson for an indent over {MAX_JSON_INDENT}")
        if (
            name in ("slice", "batch")
            and args
            and isinstance(args[0], int)
            and args[0] > size_of(value, 1 << 30)
        ):
            raise TemplateLimitError(f"the chat template asked {name} for more parts than items")
        result = context.environment.call_filter_raw(func, context, value, args, kwargs)  # type: ignore[attr-defined]
        budget.check_value(result, f"the filter {name!r}")
        return result

    return pass_context(guarded)


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus the checks described in the module doc."""

    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])
    code_generator_class = _GuardedCodeGenerator

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(finalize=_finalize, **kwargs)
        # lipsum(n) builds n paragraphs inside one call, past any check between calls; no chat template uses it.
        self.globals.pop("lipsum", None)
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()}
        self.filters.update({"bz_loop": _loop_guard, "bz_sized": _sized, "bz_text": _text})

    def add_filter(self, name: str, func: Callable[..., Any]) -> None:
        """Register a filter behind the same checks as the built-in ones."""
        self.filters[name] = _guard_filter(name, func)

    def call_filter_raw(
        self,
        func: Callable[..., Any],
        context: Context,
        value: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Call an unwrapped filter with whatever it asks to be passed (context, eval context, environment)."""
        from jinja2.utils import _PassArg

        pass_arg = _PassArg.from_obj(func)
        if pass_arg is _PassArg.context:
            return func(context, value, *args, **kwargs)
        if pass_arg is _PassArg.eval_context:
            return func(context.eval_ctx, value, *args, **kwargs)
        if pass_arg is _PassArg.environment:
            return func(self, value, *args, **kwargs)
        return func(value, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        limit = budget.limits.max_value_chars
        ints = all(isinstance(x, int) for x in (left, right))
        if operator == "**" and ints and right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateLimitError(f"the chat template tried to build an integer over {MAX_INT_BITS} bits")
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError(
                    f"the chat template tried to build an integer over {MAX_INT_BITS} bits"
                )
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and not isinstance(seq, int | float) and times > 0:
                unit = len(seq) if isinstance(seq, str) else size_of(seq, limit)
                budget.check_size(unit * times, "* repetition")
        if operator == "+" and not ints:
            budget.check_size(size_of(left, limit) + size_of(right, limit), "+ concatenation")
        if operator == "%" and isinstance(left, str):
            _check_format_string(left, "% formatting")
            budget.check_value(right, "% formatting")
        result = super().call_binop(context, operator, left, right)
        budget.check_value(result, f"the operator {operator}")
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        name = getattr(__obj, "__name__", "")
        _check_args(budget, args, kwargs, f"{name or 'a function'}()")
        # str.format arrives wrapped by the sandbox (wrap_str_format); its string is the wrapped method's self.
        subject = getattr(__obj, "__self__", None)
        if subject is None:
            subject = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if subject is not None:
            bound = _result_size(budget, name, subject, args)
            if bound is not None:
                budget.check_size(bound, f"{name}()")
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check_value(result, f"{name or 'a function'}()")
        return result


def bounded_render(render: Callable[[], str], limits: RenderLimits) -> str:
    """Run `render` (a template's render call) under `limits`; TemplateLimitError past any of them."""
    token = _BUDGET.set(_Budget(limits))
    try:
        text = render()
    finally:
        _BUDGET.reset(token)
    if len(text) > limits.max_output_chars:
        raise TemplateLimitError(f"the chat template produced more than {limits.max_output_chars} characters")
    return text
