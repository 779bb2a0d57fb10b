"""`blockzoo zoo register` refuses a chat-template bomb as the API does, and stores nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blockzoo.tiny_demo_zoo import write_lora_adapter
from blockzoo.tiny_models import TinyModelCache

BOMB = "{% set s = 'x' * 400000000 %}{{ s }}"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockzoo.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_register_refuses_a_template_bomb_and_keeps_a_sane_template(
    tiny_model_factory: TinyModelCache, tmp_path: Path
) -> None:
    base = tiny_model_factory("llama", num_layers=2)
    env = {**os.environ, "BLOCKZOO_DATA_DIR": str(tmp_path / "data")}
    assert _cli(env, "zoo", "add-base", "tiny", str(base), "--json").returncode == 0
    assert _cli(env, "tenant", "create", "acme", "--json").returncode == 0
    adapter = write_lora_adapter(base, tmp_path / "ad", 4, ["q_proj", "v_proj"], 3)
    (adapter / "chat_template.jinja").write_text(BOMB)

    refused = _cli(env, "zoo", "register", "--tenant", "acme", "--name", "bomb", str(adapter))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "chat_template.jinja" in refused.stderr and "Traceback" not in refused.stderr
    listing = json.loads(_cli(env, "zoo", "list", "--json").stdout)
    assert "bomb" not in {row["name"] for row in listing}

    (adapter / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    accepted = _cli(env, "zoo", "register", "--tenant", "acme", "--name", "fine", str(adapter))
    assert accepted.returncode == 0, accepted.stderr
