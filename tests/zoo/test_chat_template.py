"""The bounded chat-template sandbox: real templates render exactly as transformers renders them, and
every kind of bomb is stopped by a limit before it costs time or memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jinja2
import pytest

from blockzoo.tiny_models import CHAT_TEMPLATE, TinyModelCache
from router.errors import APIError
from router.template_checks import check_folder_templates
from runtime.checkpoint_loader import load_tokenizer
from zoo.chat_template import ChatTemplateError, ChatTemplates, validate_template
from zoo.template_sandbox import RenderLimits

SMOLLM2 = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Llama 3.2 Instruct: strftime_now, tojson, namespace-free system extraction, raise_exception.
LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# Qwen3: namespace, reversed slices, string methods, the {% generation %}-free thinking branch.
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
GENERATION_TAG = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.role }}: {{ m.content | tojson }}\n{% endif %}{% endfor %}"
)
REAL = {
    "chatml": CHAT_TEMPLATE,
    "smollm2": SMOLLM2,
    "llama3": LLAMA3,
    "llama3.2": LLAMA32,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "mistral": MISTRAL,
    "generation_tag": GENERATION_TAG,
}
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "  Be brief. <b>&'\"</b>  "},
        {"role": "user", "content": "What is 2+2? Émoji 🙂, 敏捷的"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nFour."},
        {"role": "user", "content": "And 3+3?", "name": "bob"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]

BOMBS = {
    "str_mul": "{% set s = 'x' * 400000000 %}{{ s }}",
    "list_mul_join": "{% set s = 'x' * 500000 %}{{ ([s] * 1000)|join }}",
    "int_pow": "{{ 2 ** 100000000 }}",
    "int_square": "{% set ns = namespace(x=7) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "nested_range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_literal_loops": "{% for a in 'xxxxxxxxxx' %}" * 9 + "{% endfor %}" * 9,
    "tilde_doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "plus_doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "literal_text_loop": "{% for i in range(100000) %}" + "y" * 4000 + "{% endfor %}",
    "block_set_capture": "{% set t %}{% for i in range(100000) %}" + "y" * 4000 + "{% endfor %}{% endset %}{{ t|length }}",
    "macro_doubling": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% else %}" + "z" * 1000
    + "{% endif %}{% endmacro %}{% set s = f(30) %}{{ s|length }}",
    "center_filter": "{{ 'x'|center(1000000000) }}",
    "replace_filter": "{{ ('x' * 100000)|replace('', 'yyyyyyyyyy') }}",
    "replace_method": "{{ ('x' * 100000).replace('', 'yyyyyyyyyy') }}",
    "indent_filter": "{{ ('\\n' * 100000)|indent(100000) }}",
    "percent_width": "{{ '%0999999999d' % 1 }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "format_repeat": "{{ '{0}{0}{0}{0}{0}{0}{0}{0}'.format('x' * 500000) }}",
    "tojson_indent": "{{ messages|tojson(indent=1000000) }}",
    "strftime_format": "{{ strftime_now('%c' * 100000) }}",
    "join_method": "{{ ('x' * 500000).join(['a'] * 1000) }}",
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory: TinyModelCache) -> Any:
    return load_tokenizer(tiny_model_factory("llama", num_layers=2))


@pytest.fixture
def templates() -> ChatTemplates:
    return ChatTemplates(RenderLimits(timeout_s=1.0, max_output_chars=1_000_000, max_value_chars=1_000_000))


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_real_templates_render_as_transformers_does(
    tokenizer: Any, templates: ChatTemplates, name: str, conversation: int
) -> None:
    source, messages = REAL[name], CONVERSATIONS[conversation]
    for generation_prompt in (True, False):
        try:
            expected: str | None = tokenizer.apply_chat_template(
                messages, chat_template=source, add_generation_prompt=generation_prompt, tokenize=False
            )
        except jinja2.TemplateError as exc:  # raise_exception: ours must refuse with the same message
            with pytest.raises(ChatTemplateError) as ours:
                templates.render(source, messages, tokenizer.special_tokens_map, generation_prompt)
            assert ours.value.kind == "raised" and str(exc) in ours.value.message
            continue
        got = templates.render(source, messages, tokenizer.special_tokens_map, generation_prompt)
        assert got == expected


def _rss_peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_stop_at_a_limit_without_time_or_memory(templates: ChatTemplates, name: str) -> None:
    _rss_peak_reset()
    before = _rss("VmRSS")
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as stopped:
        templates.render(BOMBS[name], CONVERSATIONS[0], {"bos_token": "<s>"})
    elapsed = time.monotonic() - start
    assert stopped.value.kind == "limit", stopped.value.message
    assert elapsed < 3.0, f"{name} ran {elapsed:.1f}s"
    assert _rss("VmHWM") - before < 100 << 20, f"{name} grew memory by {(_rss('VmHWM') - before) >> 20} MiB"


def test_loops_within_limits_still_render(templates: ChatTemplates) -> None:
    source = "{% for i in range(1000) %}{{ i }},{% endfor %}{{ ('ab' * 1000)|length }}{{ 'x'|center(9) }}"
    assert templates.render(source, CONVERSATIONS[0], {}).endswith("2000    x    ")


def test_sandbox_still_refuses_python_internals(templates: ChatTemplates) -> None:
    with pytest.raises(ChatTemplateError) as escape:
        templates.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONVERSATIONS[0], {})
    assert escape.value.kind == "invalid"
    with pytest.raises(ChatTemplateError):
        templates.render("{% set ns = namespace(_x=1) %}", CONVERSATIONS[0], {})
    # lipsum(100000) spends seconds and 160 MiB inside one call, where no check runs: it is not offered.
    with pytest.raises(ChatTemplateError) as lipsum:
        templates.render("{{ lipsum(100000) }}", CONVERSATIONS[0], {})
    assert lipsum.value.kind == "invalid" and "lipsum" in lipsum.value.message


@pytest.mark.parametrize("name", sorted(REAL))
def test_validate_accepts_real_templates(name: str) -> None:
    validate_template(REAL[name])


@pytest.mark.parametrize(
    "source",
    [
        BOMBS["str_mul"],
        BOMBS["nested_range"],
        BOMBS["tilde_doubling"],
        "{% for %}",
        "{{ x " + "y" * 10,
        "a" * 300_000,
    ],
)
def test_validate_refuses_obvious_bombs_and_broken_templates(source: str) -> None:
    with pytest.raises(ChatTemplateError) as refused:
        validate_template(source)
    assert refused.value.kind in ("limit", "invalid")


def test_folder_check_reads_every_template_location(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "ok"}]}'
    )
    check_folder_templates(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "tool_use", "template": "{% set s = \'x\' * 400000000 %}"}]}'
    )
    with pytest.raises(APIError) as refused:
        check_folder_templates(tmp_path)
    assert refused.value.code == "invalid_chat_template" and refused.value.message.startswith(
        "tokenizer_config.json"
    )
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(APIError) as looped:
        check_folder_templates(tmp_path)
    assert "time limit" in looped.value.message


def test_folder_check_covers_additional_templates(tmp_path: Path) -> None:
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(BOMBS["plus_doubling"])
    with pytest.raises(APIError) as refused:
        check_folder_templates(tmp_path)
    assert refused.value.message.startswith("additional_chat_templates/tool_use.jinja:")
