"""A trace is the executor's computation with its intermediates kept: same logits, transformers' logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockzoo.tiny_models import TinyModelCache
from runtime.chain import Chain
from runtime.checkpoint_loader import load_checkpoint
from runtime.executor import ModelExecutor
from runtime.kv_tensors import KVTensors
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import ScheduledChunk, SchedulerOutput
from runtime.trace import prefill_context, run_layer, trace

# A prompt longer than one KV page and than the mistral case's sliding window.
PROMPT = [1, 17, 99, 254, 31, 8, 77, 400, 12, 5, 300, 41, 42, 43, 7, 19, 260, 2, 88, 150, 9, 33]
CASES: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama"},
    "qwen3-tied": {"arch": "qwen3", "tie_embeddings": True},
    "mistral-window": {"arch": "mistral", "sliding_window": 8},
    "qwen2": {"arch": "qwen2", "num_layers": 3},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def folder(request: pytest.FixtureRequest, tiny_model_factory: TinyModelCache) -> Path:
    case = dict(CASES[request.param])
    return tiny_model_factory(case.pop("arch"), **case)


@pytest.fixture(scope="module")
def chain(folder: Path) -> Chain:
    return load_checkpoint(folder)


def executor_last_logits(chain: Chain, prompt: list[int]) -> torch.Tensor:
    kv = KVTensors(chain.config, 4, 16, chain.dtype)
    request = Request("r", prompt, SamplingParams(temperature=0))
    request.page_table = list(range(-(-len(prompt) // 16)))
    out = ModelExecutor(chain, kv).execute(
        SchedulerOutput([ScheduledChunk(request, len(prompt), True)], [], 0)
    )
    return out.logits[0]


def test_last_position_matches_executor(chain: Chain) -> None:
    t = trace(chain, PROMPT)
    assert t.logits.shape == (len(PROMPT), chain.config.vocab_size)
    assert t.logits.dtype == torch.float32
    expected = executor_last_logits(chain, PROMPT)
    torch.testing.assert_close(t.logits[-1], expected, atol=1e-5, rtol=1e-5)


def test_all_positions_match_transformers(folder: Path, chain: Chain) -> None:
    t = trace(chain, PROMPT)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), output_hidden_states=True)
    torch.testing.assert_close(t.logits, out.logits[0], atol=1e-4, rtol=1e-4)
    # transformers' hidden_states[i] is what enters layer i (its last entry is after the final norm).
    for i, captured in enumerate(t.layer_inputs):
        torch.testing.assert_close(captured, out.hidden_states[i][0], atol=1e-4, rtol=1e-4)


def test_run_layer_reproduces_each_layer_from_its_captured_input(chain: Chain) -> None:
    t = trace(chain, PROMPT)
    fresh = prefill_context(chain, len(PROMPT))
    for i, layer in enumerate(chain.layers):
        for context in (t.context, fresh, None):
            out = run_layer(chain, i, layer, chain.delta_for(i), t.layer_inputs[i], context)
            torch.testing.assert_close(out, t.layer_output(i), atol=1e-6, rtol=1e-6)
    # Another layer's block on the same input gives something else: the block really is swapped in.
    other = run_layer(chain, 0, chain.layers[1], None, t.layer_inputs[0], t.context)
    assert not torch.allclose(other, t.layer_output(0), atol=1e-3)


def test_bad_inputs_are_refused(chain: Chain) -> None:
    with pytest.raises(ValueError, match="empty"):
        trace(chain, [])
    with pytest.raises(ValueError, match="vocabulary"):
        trace(chain, [1, chain.config.vocab_size])
    t = trace(chain, PROMPT)
    with pytest.raises(ValueError, match="context is for"):
        run_layer(chain, 0, chain.layers[0], None, t.layer_inputs[0][:3], t.context)
    with pytest.raises(IndexError):
        run_layer(chain, chain.num_layers, chain.layers[0], None, t.layer_inputs[0], t.context)
    with pytest.raises(ValueError, match="shape"):
        run_layer(chain, 0, chain.layers[0], None, t.layer_inputs[0][:, :5])
