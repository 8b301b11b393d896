"""GPTQ fed by calibration Hessians, for the checkpoint writer and the planner.

`CalibratedGPTQ` streams: told the plan up front (`begin`), it runs one calibration
pass alongside the writer, and when the writer reaches a decoder layer it quantizes
all of that layer's units at once, batched across same-shaped experts, from Hessian
batches that are built and freed a few units at a time. Units a `QuantStash` already
holds (the planner's reference quantizations) are taken from it, and the pass stops
after the last layer that still needs GPTQ. `collect_hessians` keeps every Hessian
(for many plans of one *small* model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moemix.calibration.layerwise import (
    CalibratedLayer,
    HessianBatch,
    LayerwiseModel,
    calibration_samples,
    check_memory,
    describe_projection,
    iterate_layers,
)
from vllm_moemix.config.plan import Resolved
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.quant.gptq import gptq_batched
from vllm_moemix.quant.quantizers import HessianGPTQ, QuantStash
from vllm_moemix.quant.tensors import QuantizedWeight


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = True


@dataclass
class QuantizedUnit:
    unit: tuple[str, ...]
    spec: QuantSpec
    weights: dict[str, QuantizedWeight]  # per linear of the unit
    weight: torch.Tensor  # the unit's float weight [N, K] (linears stacked by rows)
    index: int  # position in the batch


def quantize_batch(
    model: LayerwiseModel, batch: HessianBatch, spec_of: Callable[[tuple[str, ...]], QuantSpec], options: GPTQOptions
) -> Iterator[QuantizedUnit]:
    """GPTQ for every unit of a Hessian batch, same-spec same-shape units in one batched run."""
    by_key: dict[tuple, list[int]] = {}
    for b, unit in enumerate(batch.units):
        rows = sum(model.linears[n].out_features for n in unit)
        by_key.setdefault((spec_of(unit), rows), []).append(b)
    for (spec, _), members in by_key.items():
        weights = torch.stack([torch.cat([model.weight(n) for n in batch.units[b]]) for b in members])
        result = gptq_batched(
            weights,
            batch.gptq[members],
            spec,
            damp=options.damp,
            act_order=options.act_order,
            clip_search=options.clip_search,
        )
        for j, b in enumerate(members):
            unit = batch.units[b]
            parts = result.weights[j].split_rows([model.linears[n].out_features for n in unit])
            yield QuantizedUnit(unit, spec, dict(zip(unit, parts)), weights[j], b)
        del weights, result


def _pass(
    model_dir: str | Path,
    texts: list[Path],
    num_samples: int,
    seq_len: int,
    progress: bool,
    device: str | None,
    stage: str,
    last_layer: int | None = None,
) -> tuple[LayerwiseModel, Iterator[CalibratedLayer]]:
    from transformers import AutoTokenizer

    model = LayerwiseModel(model_dir, device)
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), texts, num_samples, seq_len)
    memory = check_memory(model, samples.numel())  # refuses before any work when one layer cannot fit
    if progress:
        print(memory)

    layers = model.config.num_hidden_layers if last_layer is None else last_layer + 1

    def report(seconds: float) -> None:
        if progress:
            print(describe_projection(stage, seconds, layers))

    return model, iterate_layers(
        model, samples, progress=progress, stage=stage, on_first_layer=report, last_layer=last_layer
    )


def collect_hessians(
    model_dir: str | Path,
    texts: list[Path],
    num_samples: int = 32,
    seq_len: int = 256,
    progress: bool = True,
    **gptq_options,
) -> HessianGPTQ:
    """One calibration pass, every linear's Hessian kept (small models only: memory grows with experts)."""
    _, layers = _pass(model_dir, texts, num_samples, seq_len, progress, "cpu", "calibrate")
    hessians: dict[str, torch.Tensor] = {}
    for layer in layers:
        for batch in layer.hessian_batches(with_loss=False):
            for unit, H in zip(batch.units, batch.gptq):
                hessians.update(dict.fromkeys(unit, H))
    return HessianGPTQ(hessians, **gptq_options)


class CalibratedGPTQ:
    """GPTQ for the checkpoint writer; calibrates alongside it, one layer at a time."""

    name = "gptq"

    def __init__(
        self,
        model_dir: str | Path,
        texts: list[Path],
        num_samples: int = 32,
        seq_len: int = 256,
        damp: float = 0.01,
        act_order: bool = False,
        progress: bool = True,
        clip_search: bool = True,
        device: str | None = None,
        reuse: QuantStash | None = None,
    ):
        self.model_dir, self.texts, self.num_samples, self.seq_len = model_dir, texts, num_samples, seq_len
        self.options = GPTQOptions(damp, act_order, clip_search)
        self.progress, self.device, self.reuse = progress, device, reuse
        self._specs: dict[tuple[str, ...], QuantSpec] | None = None
        self._layers: Iterator[CalibratedLayer] | None = None
        self._model: LayerwiseModel | None = None
        self._done: dict[str, QuantizedWeight] = {}
        self._next_layer = 0

    def begin(self, resolved: Resolved, linears: dict) -> None:
        """The plan to quantize: which units need GPTQ (those not already in `reuse`). Each checkpoint written
        starts a fresh calibration pass, so one quantizer serves several plans (the held-out check)."""
        self._layers, self._done, self._next_layer = None, {}, 0
        specs = {}
        for name, spec in resolved.items():
            unit = linears[name].fused_with or (name,)
            if spec is not None and not (self.reuse and all(self.reuse.has(n, spec) for n in unit)):
                specs[unit] = spec
        self._specs = specs
        self._last_layer = max((linears[u[0]].layer for u in specs), default=-1)

    def __call__(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        if self.reuse is not None and self.reuse.has(name, spec):
            return self.reuse.get(name, spec)
        if self._specs is None:
            raise RuntimeError("CalibratedGPTQ.begin(resolved, linears) must be called before quantizing")
        if name not in self._done:
            self._advance_to(name)
        quantized = self._done.pop(name)
        if quantized.spec != spec:
            raise RuntimeError(f"{name}: quantized at {quantized.spec}, asked for {spec}")
        return quantized

    def _advance_to(self, name: str) -> None:
        if self._layers is None:
            self._model, self._layers = _pass(
                self.model_dir,
                self.texts,
                self.num_samples,
                self.seq_len,
                self.progress,
                self.device,
                "gptq",
                self._last_layer,
            )
        target = self._model.linears[name].layer
        if target < self._next_layer:
            raise RuntimeError(
                f"GPTQ needs linears in layer order; asked for layer {target} after {self._next_layer - 1}"
            )
        self._done = {}  # a layer's results go once the writer moves past it
        for layer in self._layers:
            self._next_layer = layer.index + 1
            if layer.index == target:
                self._quantize_layer(layer)
                return
            if any(self._model.linears[u[0]].layer == layer.index for u in self._specs):
                raise RuntimeError(f"GPTQ needs linears in layer order; layer {layer.index} was skipped")
        raise RuntimeError(f"{name}: layer {target} not reached by calibration")

    def _quantize_layer(self, layer: CalibratedLayer) -> None:
        wanted = self._specs
        units = [u for u in layer.units() if u in wanted]
        with tqdm(
            total=len(units), desc=f"layer {layer.index}", unit="unit", leave=False, disable=not self.progress
        ) as bar:
            for batch in layer.hessian_batches(lambda unit: unit in wanted, with_loss=False):
                for done in quantize_batch(self._model, batch, wanted.__getitem__, self.options):
                    self._done.update(done.weights)
                    bar.update()
