"""The demo's GGUF fine-tune composer: `transformers` reads the composed file's trained layer exactly,
every other tensor as the base's, and the zoo stores only the trained layer as new."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockzoo.demo_gguf import ComposeError, compose_finetune_gguf
from tests.zoo.gguf_files import TinySpec, write_tiny_gguf
from tests.zoo.zoo_helpers import add_tenant, open_zoo


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor], int]:
    root = tmp_path_factory.mktemp("compose")
    base = write_tiny_gguf(root / "base.gguf", TinySpec("llama"))
    weights = hf_weights(base)
    top = max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers."))
    gen = torch.Generator().manual_seed(3)
    trained = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).half()
        for k, v in weights.items()
        if k.startswith(f"model.layers.{top}.")
    }
    out = compose_finetune_gguf(base, trained, root / "ft.gguf")
    return base, out, trained, top


def test_transformers_reads_the_trained_layer_and_the_base(
    composed: tuple[Path, Path, dict[str, torch.Tensor], int],
) -> None:
    base, out, trained, top = composed
    before, after = hf_weights(base), hf_weights(out)
    for name, tensor in trained.items():
        # q/k exact too: the composer applied llama.cpp's row permutation that readers undo
        assert torch.equal(after[name], tensor.float()), name
    untouched = [k for k in before if not k.startswith(f"model.layers.{top}.")]
    assert untouched
    for name in untouched:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("dequantize", [False, True])
def test_only_the_trained_layer_is_stored_new(
    composed: tuple[Path, Path, dict[str, torch.Tensor], int], tmp_path: Path, dequantize: bool
) -> None:
    base, out, _, _ = composed
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("tiny", base, dequantize=dequantize)
    add_tenant(zoo, "bob")
    report = zoo.register("bob", "ft", out, base="tiny", dequantize=dequantize)
    assert report.blocks_new == 1
    assert report.blocks_shared == report.blocks_total - 1


def test_a_tensor_the_base_lacks_is_refused(
    composed: tuple[Path, Path, dict[str, torch.Tensor], int],
) -> None:
    base, out, trained, top = composed
    name = next(iter(trained))
    with pytest.raises(ComposeError, match="not in"):
        compose_finetune_gguf(
            base, {name.replace(f".{top}.", ".99."): trained[name]}, out.with_name("x.gguf")
        )
    with pytest.raises(ComposeError, match="decoder layer"):
        compose_finetune_gguf(base, {"lm_head.weight": trained[name]}, out.with_name("y.gguf"))
    assert not out.with_name("x.gguf").exists()
