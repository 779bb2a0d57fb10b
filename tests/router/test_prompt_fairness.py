"""The prompt pool is shared fairly: one tenant's slow templates cannot queue another tenant's prompts.

The check is on order, not on time: with two workers, a tenant holds at most one, so another tenant's
prompt finishes while the first tenant's first slow render is still running.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from router.errors import APIError
from router.prompts import PromptBuilder
from runtime.checkpoint_loader import load_tokenizer

# Runs until the render deadline: every loop stays under the sandbox's size limits.
SLOW = "{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_factory: TinyModelCache) -> tuple[Any, Any]:
    fast = load_tokenizer(Path(tiny_model_factory("llama", num_layers=1)))
    slow = copy.deepcopy(fast)
    slow.chat_template = SLOW
    return fast, slow


def test_one_tenants_slow_templates_do_not_queue_another_tenants_prompt(tokenizers: tuple[Any, Any]) -> None:
    fast, slow = tokenizers
    builder = PromptBuilder(
        Settings(prompt_workers=2, chat_template_timeout_s=0.5, data_dir=Path("/nonexistent"))
    )
    finished: list[str] = []

    async def render(tenant: str, tokenizer: Any, label: str) -> None:
        try:
            await builder.chat_ids(tenant, tokenizer, MESSAGES, 4096)
        except APIError as exc:
            assert exc.code == "invalid_chat_template"  # the slow template ran into its time limit
        finished.append(label)

    async def main() -> None:
        bombs = [asyncio.create_task(render("mallory", slow, f"bomb{i}")) for i in range(4)]
        await asyncio.sleep(0.05)  # the bombs are queued first
        await render("alice", fast, "alice")
        await asyncio.gather(*bombs)

    try:
        asyncio.run(main())
    finally:
        builder.shutdown()
    assert finished.index("alice") == 0, finished
    assert sorted(finished) == ["alice", "bomb0", "bomb1", "bomb2", "bomb3"]
