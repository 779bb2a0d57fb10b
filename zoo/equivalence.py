"""BlockLLM's equivalence evaluation: how far a fine-tune's layers and outputs are from its base's.

Per layer, two views: how much the weights moved (relative Frobenius distance), and how much the
layer's output changes if the base's block is substituted for the fine-tune's, measured on the very
hidden states the fine-tune feeds that layer on calibration prompts. Layers whose substitution error
is within a tolerance can be served by the shared base block. Model-wide, the KL divergence and
top-1 agreement of next-token distributions say what a set of substitutions costs in the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from runtime.blocks import LayerBlock
from runtime.chain import Chain
from runtime.linear import dense_tensors
from runtime.lora import LayerLora
from runtime.trace import Trace, run_layer, trace
from zoo.blocks import fields_for

Progress = Callable[[int, int], None]


class LayerReport(NamedTuple):
    """How layer `layer` of a fine-tune compares with the base's layer at the same position.

    `rel_output_error` = ‖y_base − y_tuned‖ / ‖y_tuned‖ and `cosine` (per token, averaged) compare the
    two layers' outputs on the fine-tune's own hidden states, averaged over prompts.
    `rel_update_error` divides the same difference by the tuned layer's update ‖y_tuned − x‖ instead,
    which the residual stream does not dilute. Identical layers report zeros and cosine 1.
    """

    layer: int
    identical: bool
    rel_frobenius: float
    rel_output_error: float
    rel_update_error: float
    cosine: float


class ModelEffect(NamedTuple):
    """KL(reference ‖ candidate) of next-token distributions, averaged over `num_positions`, and top-1 agreement."""

    mean_kl: float
    top1_agreement: float
    num_positions: int


def layer_tensors(layer: LayerBlock) -> dict[str, torch.Tensor]:
    """A layer block's tensors under their block-local names (e.g. "self_attn.q_proj.weight")."""
    return dict(layer.tensors)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and raw bytes (what makes block ids equal)."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # Byte comparison: -0.0 vs 0.0 or NaN payloads make different blocks, as they do for block ids.
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _same_lora(a: LayerLora | None, b: LayerLora | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.projections.keys() != b.projections.keys():
        return False
    for name, pa in a.projections.items():
        pb = b.projections[name]
        if pa.scaling != pb.scaling or not (same_bytes(pa.a, pb.a) and same_bytes(pa.b, pb.b)):
            return False
    return True


def layers_identical(
    a: LayerBlock, a_lora: LayerLora | None, b: LayerBlock, b_lora: LayerLora | None
) -> bool:
    """Whether two layer positions compute the same thing bit for bit: equal bytes and equal deltas."""
    if a is not b:
        ta, tb = layer_tensors(a), layer_tensors(b)
        if ta.keys() != tb.keys() or not all(same_bytes(ta[k], tb[k]) for k in ta):
            return False
    return _same_lora(a_lora, b_lora)


def _effective_weights(layer: LayerBlock, lora: LayerLora | None) -> dict[str, torch.Tensor]:
    """fp32 tensors of the layer (4-bit projections dequantized) with any delta merged into its projection weights."""
    out = {k: t.float() for k, t in dense_tensors(layer_tensors(layer), "layer").items()}
    if lora is not None:
        for name, p in lora.projections.items():
            key = f"{name}.weight"
            out[key] = out[key] + p.scaling * (p.b.float() @ p.a.float())
    return out


def rel_frobenius(
    base: LayerBlock, base_lora: LayerLora | None, tuned: LayerBlock, tuned_lora: LayerLora | None
) -> float:
    """‖W_tuned − W_base‖_F / ‖W_base‖_F over all the layer's tensors together (deltas merged)."""
    wb, wt = _effective_weights(base, base_lora), _effective_weights(tuned, tuned_lora)
    if wb.keys() != wt.keys():
        raise ValueError(f"layers hold different tensors: {sorted(wb.keys() ^ wt.keys())}")
    diff = sum(float((wt[k] - wb[k]).double().pow(2).sum()) for k in wb)
    norm = sum(float(wb[k].double().pow(2).sum()) for k in wb)
    return _ratio(math.sqrt(diff), math.sqrt(norm))


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _check_compatible(base: Chain, tuned: Chain) -> None:
    if base.num_layers != tuned.num_layers:
        raise ValueError(f"base has {base.num_layers} layers, fine-tune has {tuned.num_layers}")
    for i in range(base.num_layers):
        fb, ft = fields_for("layer", base.config, i), fields_for("layer", tuned.config, i)
        if fb != ft:
            diff = sorted(k for k in fb if fb[k] != ft.get(k))
            raise ValueError(f"layer {i}: base and fine-tune architectures differ in {diff}")


def _check_calibration(calib: list[list[int]]) -> None:
    if not calib or any(not p for p in calib):
        raise ValueError("calibration needs at least one prompt, and no prompt may be empty")


def _output_agreement(base: Chain, index: int, traces: list[Trace]) -> tuple[float, float, float]:
    """Mean over prompts of (rel_output_error, rel_update_error, cosine) for substituting base's layer."""
    err = upd = cos = 0.0
    for t in traces:
        x = t.layer_inputs[index].float()
        y_t = t.layer_output(index).float()
        y_b = run_layer(
            base, index, base.layers[index], base.delta_for(index), t.layer_inputs[index], t.context
        )
        gap = float(torch.linalg.vector_norm(y_b.float() - y_t))
        err += _ratio(gap, float(torch.linalg.vector_norm(y_t)))
        upd += _ratio(gap, float(torch.linalg.vector_norm(y_t - x)))
        cos += float(F.cosine_similarity(y_b.float(), y_t, dim=-1).mean())
    n = len(traces)
    return err / n, upd / n, cos / n


def layer_reports(
    base: Chain, tuned: Chain, calib: list[list[int]], progress: Progress | None = None
) -> list[LayerReport]:
    """Compare every layer of `tuned` with `base`'s layer at the same position (see LayerReport).

    The fine-tune is traced once per calibration prompt; the base's layer i then runs on the hidden
    states entering the fine-tune's layer i. Memory grows with prompts × layers × tokens × hidden size.
    `progress(done, num_layers)` is called after each layer.
    """
    _check_compatible(base, tuned)
    _check_calibration(calib)
    traces: list[Trace] | None = None
    reports: list[LayerReport] = []
    for i in range(tuned.num_layers):
        lb, lb_lora, lt, lt_lora = base.layers[i], base.delta_for(i), tuned.layers[i], tuned.delta_for(i)
        if layers_identical(lb, lb_lora, lt, lt_lora):
            reports.append(LayerReport(i, True, 0.0, 0.0, 0.0, 1.0))
        else:
            if traces is None:  # only traced when some layer differs
                traces = [trace(tuned, p) for p in calib]
            err, upd, cos = _output_agreement(base, i, traces)
            reports.append(LayerReport(i, False, rel_frobenius(lb, lb_lora, lt, lt_lora), err, upd, cos))
        if progress is not None:
            progress(i + 1, tuned.num_layers)
    return reports


def substitution_plan(reports: list[LayerReport], tol: float) -> list[int]:
    """Indices of differing layers whose base block reproduces the output within `tol` (relative)."""
    if not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol}")
    return [r.layer for r in reports if not r.identical and r.rel_output_error <= tol]


def model_effect(
    reference: Chain, candidate: Chain, calib: list[list[int]], progress: Progress | None = None
) -> ModelEffect:
    """KL(reference ‖ candidate) and top-1 agreement at every position of every calibration prompt.

    `progress(done, num_prompts)` is called after each prompt.
    """
    _check_calibration(calib)
    if reference.config.vocab_size != candidate.config.vocab_size:
        raise ValueError(
            f"vocabularies differ: {reference.config.vocab_size} vs {candidate.config.vocab_size}"
        )
    kl_sum = 0.0
    agree = 0
    positions = 0
    for done, prompt in enumerate(calib, start=1):
        log_p = torch.log_softmax(trace(reference, prompt).logits.double(), dim=-1)
        log_q = torch.log_softmax(trace(candidate, prompt).logits.double(), dim=-1)
        p = log_p.exp()
        # Terms with p = 0 contribute nothing (0 · log 0 = 0), even where q is 0 too.
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
        kl_sum += float(kl.sum())
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        positions += len(prompt)
        if progress is not None:
            progress(done, len(calib))
    return ModelEffect(max(kl_sum / positions, 0.0), agree / positions, positions)


def perplexity(chain: Chain, calib: list[list[int]]) -> float:
    """exp of the mean negative log-likelihood of each calibration token after the first."""
    _check_calibration(calib)
    nll = 0.0
    count = 0
    for prompt in calib:
        if len(prompt) < 2:
            continue
        log_p = torch.log_softmax(trace(chain, prompt).logits.double(), dim=-1)
        targets = torch.tensor(prompt[1:])
        nll -= float(log_p[:-1].gather(1, targets[:, None]).sum())
        count += len(prompt) - 1
    if count == 0:
        raise ValueError("perplexity needs a calibration prompt of at least two tokens")
    return math.exp(nll / count)
