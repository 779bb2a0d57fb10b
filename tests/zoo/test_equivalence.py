"""Equivalence evaluation tells untouched, slightly and heavily changed layers apart; calibration inputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockzoo.tiny_models import TinyModelCache
from runtime.chain import Chain
from runtime.checkpoint_loader import load_checkpoint, load_tokenizer
from runtime.lora import PROJECTIONS, LayerLora, LoraProjection
from zoo.calibration import (
    CALIBRATION_TEXTS,
    CalibrationError,
    calibration_token_ids,
    load_calibration_file,
)
from zoo.equivalence import (
    LayerReport,
    layer_reports,
    layer_tensors,
    model_effect,
    rel_frobenius,
    substitution_plan,
)

Perturb = Callable[[str, torch.Tensor, torch.Generator], torch.Tensor]


def fine_tune(base: Path, out: Path, perturb: Perturb, seed: int = 0) -> Path:
    """A copy of `base` whose tensors pass through `perturb(name, tensor, generator)`."""
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        save_file(
            {k: perturb(k, v, gen).contiguous() for k, v in tensors.items()}, f, metadata={"format": "pt"}
        )
    return out


def scale_noise(prefix: str, rel: float) -> Perturb:
    """Multiply every tensor under `prefix` elementwise by (1 + rel · N(0, 1))."""

    def perturb(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not name.startswith(prefix):
            return t
        return t * (1 + rel * torch.randn(t.shape, generator=gen))

    return perturb


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama", num_layers=3)


@pytest.fixture(scope="module")
def base(base_dir: Path) -> Chain:
    return load_checkpoint(base_dir)


@pytest.fixture(scope="module")
def calib(base_dir: Path) -> list[list[int]]:
    return calibration_token_ids(load_tokenizer(base_dir), CALIBRATION_TEXTS[:4], max_len=24)


@pytest.fixture(scope="module")
def tuned(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """Layer 0 heavily changed, layer 1 changed by ~1e-5 relative, layer 2 untouched."""
    tiny, large = scale_noise("model.layers.1.", 1e-5), scale_noise("model.layers.0.", 0.5)

    def perturb(name: str, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return large(name, tiny(name, t, gen), gen)

    return load_checkpoint(fine_tune(base_dir, tmp_path_factory.mktemp("ft") / "model", perturb))


def test_reports_tell_untouched_small_and_large_changes_apart(
    base: Chain, tuned: Chain, calib: list[list[int]]
) -> None:
    calls: list[tuple[int, int]] = []
    reports = layer_reports(base, tuned, calib, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [r.layer for r in reports] == [0, 1, 2]
    large, tiny, same = reports
    assert same == LayerReport(2, True, 0.0, 0.0, 0.0, 1.0)
    assert not tiny.identical and not large.identical
    assert 3e-6 < tiny.rel_frobenius < 3e-5
    assert large.rel_frobenius > 0.2
    assert 0 < tiny.rel_output_error < 1e-4
    assert large.rel_output_error > 0.05
    assert tiny.rel_update_error < large.rel_update_error
    assert tiny.cosine > 0.99999 > large.cosine
    assert substitution_plan(reports, tol=1e-3) == [1]
    assert substitution_plan(reports, tol=10.0) == [0, 1]
    assert substitution_plan(reports, tol=0.0) == []
    with pytest.raises(ValueError, match="tol"):
        substitution_plan(reports, tol=-1.0)


def test_output_error_is_measured_on_the_tuned_models_own_hidden_states(
    base: Chain, tuned: Chain, calib: list[list[int]]
) -> None:
    # The upper layers are byte-identical, but their inputs differ (layer 0 changed). Running the base's
    # layer 2 on the fine-tune's inputs must agree exactly, not reflect the changed input.
    swapped = Chain(
        tuned.config,
        tuned.embed,
        [tuned.layers[0], tuned.layers[1], base.layers[2]],
        tuned.head,
        tuned.rotary,
        tuned.dtype,
        b"x",
    )
    reports = layer_reports(swapped, tuned, calib)
    assert [r.identical for r in reports] == [True, True, True]
    assert base.layers[2] is not tuned.layers[2]  # identity came from the bytes, not from the object


def test_rel_frobenius_counts_deltas(base: Chain) -> None:
    layer = base.layers[0]
    assert rel_frobenius(layer, None, layer, None) == 0.0
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, layer.q_proj.weight.shape[1], generator=gen)
    b = torch.randn(layer.q_proj.weight.shape[0], 2, generator=gen)
    lora = LayerLora({"self_attn.q_proj": LoraProjection(a, b, 0.5)})
    expected = float(torch.linalg.matrix_norm(0.5 * b @ a)) / (
        sum(float(t.double().pow(2).sum()) for t in layer_tensors(layer).values()) ** 0.5
    )
    assert rel_frobenius(layer, None, layer, lora) == pytest.approx(expected, rel=1e-5)


def test_layer_tensors_use_block_local_names(base: Chain) -> None:
    names = set(layer_tensors(base.layers[0]))
    assert {f"{p}.weight" for p in PROJECTIONS} <= names
    assert {"input_layernorm.weight", "post_attention_layernorm.weight"} <= names


def test_model_effect(base: Chain, tuned: Chain, calib: list[list[int]]) -> None:
    same = model_effect(base, base, calib)
    assert same.mean_kl == 0.0
    assert same.top1_agreement == 1.0
    assert same.num_positions == sum(len(p) for p in calib)
    changed = model_effect(base, tuned, calib)
    assert changed.mean_kl > 1e-3
    assert changed.top1_agreement < 1.0
    assert changed.num_positions == same.num_positions


def test_model_effect_grows_with_the_change(
    base_dir: Path, base: Chain, calib: list[list[int]], tmp_path: Path
) -> None:
    slight = load_checkpoint(fine_tune(base_dir, tmp_path / "slight", scale_noise("model.layers.1.", 1e-3)))
    heavy = load_checkpoint(fine_tune(base_dir, tmp_path / "heavy", scale_noise("model.layers.1.", 0.3)))
    done: list[int] = []
    small = model_effect(base, slight, calib, progress=lambda d, t: done.append(d))
    assert done == list(range(1, len(calib) + 1))
    assert 0 < small.mean_kl < model_effect(base, heavy, calib).mean_kl


def test_inputs_are_checked(base: Chain, tiny_model_factory: TinyModelCache, calib: list[list[int]]) -> None:
    other = load_checkpoint(tiny_model_factory("llama", num_layers=2))
    with pytest.raises(ValueError, match="layers"):
        layer_reports(base, other, calib)
    with pytest.raises(ValueError, match="calibration"):
        layer_reports(base, base, [])
    with pytest.raises(ValueError, match="calibration"):
        model_effect(base, base, [[1, 2], []])


# ---- calibration inputs ------------------------------------------------------------------------


def test_calibration_token_ids(base_dir: Path) -> None:
    tokenizer = load_tokenizer(base_dir)
    full = calibration_token_ids(tokenizer, max_len=10_000)
    assert len(full) == len(CALIBRATION_TEXTS) >= 12
    for ids, text in zip(full, CALIBRATION_TEXTS, strict=True):
        assert ids == tokenizer.encode(text)
    cut = calibration_token_ids(tokenizer, max_len=16)
    assert [ids[:16] for ids in full] == cut
    assert max(len(ids) for ids in full) > 16  # the limit really cut something
    assert calibration_token_ids(tokenizer, ["hello world"]) == [tokenizer.encode("hello world")]
    with pytest.raises(CalibrationError, match="max_len"):
        calibration_token_ids(tokenizer, max_len=0)
    with pytest.raises(CalibrationError, match="empty"):
        calibration_token_ids(tokenizer, ["ok", "  "])
    with pytest.raises(CalibrationError, match="no calibration texts"):
        calibration_token_ids(tokenizer, [])


def test_load_calibration_file(tmp_path: Path) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text("first prompt\n\n  [second] prompt  \nthird\n")
    assert load_calibration_file(lines) == ["first prompt", "[second] prompt", "third"]
    as_json = tmp_path / "prompts.data"
    as_json.write_text(json.dumps(["one\ntwo lines", "three"]))
    assert load_calibration_file(as_json) == ["one\ntwo lines", "three"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "no calibration prompts"),
        ("\n  \n", "no calibration prompts"),
        ("[]", "no calibration prompts"),
        ('["ok", 3]', "item 1"),
        ('["ok", ""]', "item 1"),
    ],
)
def test_bad_calibration_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "calib"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        load_calibration_file(path)


def test_missing_or_binary_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration_file(tmp_path / "nope.txt")
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="UTF-8"):
        load_calibration_file(binary)
