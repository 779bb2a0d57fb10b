"""`blockzoo generate` prints only the completion, identical to the offline API's text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from blockzoo.tiny_models import TinyModelCache
from runtime.sampling_params import SamplingParams
from tests.runtime.engine_helpers import make_llm


def test_generate_prints_only_the_completion(tiny_model_factory: TinyModelCache, tmp_path: Path) -> None:
    model = tiny_model_factory("llama")
    prompt = "The zoo keeps every block once"
    env = {**os.environ, "BLOCKZOO_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockzoo.cli",
            "generate",
            str(model),
            "--prompt",
            prompt,
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    expected = make_llm(model).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )[0]
    assert proc.stdout == expected.text
    assert expected.text


def test_generate_reports_bad_model_cleanly(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    proc = subprocess.run(
        [sys.executable, "-m", "blockzoo.cli", "generate", str(tmp_path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "BertForMaskedLM" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
