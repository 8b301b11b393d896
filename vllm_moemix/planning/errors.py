"""The optimizer's error table: for every unit and candidate (bits, group), the summed squared output
error tr(dW H_loss dW^T) that quantization would cause.

Two models:
  - `estimate` (default): quantize each unit once, at the reference width the budget is nearest to,
    with the real quantizer (GPTQ), and measure that error exactly; every other candidate's error is
    that exact value scaled by the ratio of cheap proxies, the Hessian-diagonal-weighted RTN error
    sum_ij dW_ij^2 H_jj of the candidate over the reference. One GPTQ per unit instead of one per
    candidate (4, or 16 under byte budgets), and the reference quantizations are kept (`QuantStash`)
    for the writer, so a plan that picks the reference width quantizes nothing twice.
  - `full`: quantize each unit at every candidate and measure each exactly (the reference the estimate
    is checked against: rank correlation and KL at equal bytes in benchmarks/quality.py).
  - `fisher`: as `estimate`, with every dW^2 weighted by the weights' diagonal empirical Fisher instead of
    the layer's input Hessian (calibration/fisher.py): the loss change through the rest of the network, not
    the unit's own output change. Ranks units by their real output cost better (docs/quality/sensitivity.md);
    needs the whole model in memory.
  - `auto` (the default): `fisher` when the model fits for it, else `estimate`; the caller says which.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_moemix.calibration.fisher import fisher_fits
from vllm_moemix.calibration.gptq import GPTQOptions, quantize_batch
from vllm_moemix.calibration.layerwise import HessianBatch, LayerwiseModel
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.planning.scores import hessian_error
from vllm_moemix.quant.quantizers import QuantStash
from vllm_moemix.quant.rtn import fake_quantize_rtn, quantize_rtn

ERROR_MODELS = ("auto", "estimate", "full", "fisher")


def resolve_error_model(requested: str, model_dir) -> tuple[str, str]:
    """(error model to use, one line saying why) for `requested`, resolving `auto` by memory."""
    if requested != "auto":
        return requested, f"error model: {requested}"
    fits, detail = fisher_fits(model_dir)
    if fits:
        return "fisher", f"error model: fisher (the loss through the whole network; {detail})"
    return "estimate", f"error model: estimate (layer-local; the fisher model would need {detail})"


def _quantized_units(
    model: LayerwiseModel,
    batch: HessianBatch,
    spec_of: Callable[[tuple[str, ...]], QuantSpec],
    quantizer: str,
    options: GPTQOptions,
):
    """(index in batch, float weight [N, K], per-linear quantized weights) for each unit of the batch."""
    if quantizer == "gptq":
        for done in quantize_batch(model, batch, spec_of, options):
            yield done.index, done.weight, done.weights
        return
    for b, unit in enumerate(batch.units):
        weights = {n: model.weight(n) for n in unit}
        yield b, torch.cat(list(weights.values())), {n: quantize_rtn(w, spec_of(unit)) for n, w in weights.items()}


def batch_errors(
    model: LayerwiseModel,
    batch: HessianBatch,
    candidates: Callable[[tuple[str, ...]], list[QuantSpec]],
    reference: Callable[[tuple[str, ...]], QuantSpec],
    quantizer: str = "gptq",
    options: GPTQOptions | None = None,
    error_model: str = "estimate",
    stash: QuantStash | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
) -> dict[tuple[str, ...], dict[QuantSpec, float]]:
    """Unit -> candidate spec -> output error, for the units of one Hessian batch (`fisher`: per-linear weights
    of dW^2 for the `fisher` error model)."""
    options = options or GPTQOptions()
    errors: dict[tuple[str, ...], dict[QuantSpec, float]] = {unit: {} for unit in batch.units}
    if error_model == "full":
        specs = sorted({s for unit in batch.units for s in candidates(unit)}, key=lambda s: (s.bits, s.group_size))
        for spec in specs:
            todo = [u for u in batch.units if spec in candidates(u)]
            sub = _sub_batch(batch, todo)
            for b, weight, quantized in _quantized_units(model, sub, lambda _u, s=spec: s, quantizer, options):
                dequantized = torch.cat([q.dequantize() for q in quantized.values()])
                errors[sub.units[b]][spec] = hessian_error(weight, dequantized, sub.loss[b])
        return errors
    for b, weight, quantized in _quantized_units(model, batch, reference, quantizer, options):
        unit, ref = batch.units[b], reference(batch.units[b])
        dequantized = torch.cat([q.dequantize() for q in quantized.values()])
        if stash is not None:
            for name, q in quantized.items():
                stash.put(name, q)
        if error_model == "fisher":
            weighting = torch.cat([fisher[name] for name in quantized]).to(weight)
            exact = float(((weight - dequantized).pow(2) * weighting).sum())
        else:
            weighting = torch.diagonal(batch.loss[b])
            exact = hessian_error(weight, dequantized, batch.loss[b])
        proxy = {s: float(((weight - fake_quantize_rtn(weight, s)).pow(2) * weighting).sum()) for s in candidates(unit)}
        proxy.setdefault(ref, float(((weight - fake_quantize_rtn(weight, ref)).pow(2) * weighting).sum()))
        scale = exact / proxy[ref] if proxy[ref] > 0 else 1.0
        errors[unit] = {s: exact if s == ref else scale * p for s, p in proxy.items() if s in candidates(unit)}
    return errors


def _sub_batch(batch: HessianBatch, units: list[tuple[str, ...]]) -> HessianBatch:
    index = [batch.units.index(u) for u in units]
    return HessianBatch(units, batch.gptq[index], None if batch.loss is None else batch.loss[index])
