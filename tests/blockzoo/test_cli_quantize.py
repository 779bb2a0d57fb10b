"""`blockzoo zoo quantize` from the command line: a 4-bit twin, its report, and clean refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blockzoo.tiny_models import TinyModelCache


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockzoo.cli", "zoo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_quantize_command_registers_a_twin_and_reports_quality(
    tiny_model_factory: TinyModelCache, tmp_path: Path
) -> None:
    model = tiny_model_factory("llama", hidden_size=128, intermediate_size=256, init_std=0.05)
    env = {**os.environ, "BLOCKZOO_DATA_DIR": str(tmp_path)}
    assert _cli(env, "add-base", "tiny", str(model), "--json").returncode == 0
    calibration = tmp_path / "calib.txt"
    calibration.write_text("The keeper lit the lamp.\nPrices rose by three percent in May.\n")

    proc = _cli(
        env,
        "quantize",
        "tiny",
        "--method",
        "gptq",
        "--group-size",
        "32",
        "--act-order",
        "--calibration",
        str(calibration),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "tiny-w4a16-g32-gptq-act" and report["quantization"] == "w4a16-g32-gptq-act"
    assert report["blocks_new"] == 2 and report["quantized_layer_bytes"] < report["source_layer_bytes"] / 4
    assert 0 <= report["mean_kl"] < 0.05 and report["positions"] > 0
    listing = json.loads(_cli(env, "list", "--json").stdout)
    assert {"tiny", "tiny-w4a16-g32-gptq-act"} <= {row["name"] for row in listing}

    text = _cli(env, "quantize", "tiny", "--group-size", "64", "--name", "tiny-q")
    assert text.returncode == 0, text.stderr
    assert "perplexity" in text.stdout and "top-1 agreement" in text.stdout

    for bad, message in (
        (("--bits", "3"), "bits"),
        (("--group-size", "96"), "not a multiple of the group size"),
        (("--name", "tiny-q"), "already has a model named"),
    ):
        proc = _cli(env, "quantize", "tiny", *bad)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(env, "quantize", "nope")
    assert proc.returncode == 2 and "not found" in proc.stderr
