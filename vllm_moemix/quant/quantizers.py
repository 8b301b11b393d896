"""The one quantizer interface the checkpoint writer, the planner's error table and the benchmarks share.

A quantizer maps (linear name, float weight [N, K], spec) to the stored form. The writer calls it in
decoder-layer order, so a calibrated quantizer (`vllm_moemix.calibration.gptq.CalibratedGPTQ`) can run its
calibration pass alongside, one layer at a time. `make_quantizer` turns the CLI's `--quantizer` name into one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.quant.gptq import gptq_quantize
from vllm_moemix.quant.rtn import quantize_rtn
from vllm_moemix.quant.tensors import QuantizedWeight

QUANTIZERS = ("gptq", "rtn")


class Quantizer(Protocol):
    name: str  # recorded in the checkpoint's quantization_config

    def __call__(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight: ...


class RTNQuantizer:
    """Round to nearest: needs no data (clip_search scores clipped ranges by plain weight error)."""

    name = "rtn"

    def __init__(self, clip_search: bool = False):
        self.clip_search = clip_search

    def __call__(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        return quantize_rtn(weight, spec, clip_search=self.clip_search)


class HessianGPTQ:
    """GPTQ with each linear's input Hessian looked up by name (`hessian` is the hook calibrated subclasses
    override to compute them on demand)."""

    name = "gptq"

    def __init__(
        self,
        hessians: Mapping[str, torch.Tensor],
        damp: float = 0.01,
        act_order: bool = False,
        clip_search: bool = True,
    ):
        self.hessians, self.damp, self.act_order, self.clip_search = hessians, damp, act_order, clip_search

    def hessian(self, name: str) -> torch.Tensor:
        return self.hessians[name]

    def __call__(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        return gptq_quantize(
            weight, self.hessian(name), spec, damp=self.damp, act_order=self.act_order, clip_search=self.clip_search
        )


class QuantStash:
    """Quantized linears kept on disk between planning and writing: the planner quantizes every unit once at
    its reference width, and the writer takes those it kept instead of quantizing them again."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._specs: dict[str, QuantSpec] = {}

    def put(self, name: str, quantized: QuantizedWeight) -> None:
        torch.save(quantized.tensors("w"), self.dir / f"{name}.pt")
        self._specs[name] = quantized.spec

    def has(self, name: str, spec: QuantSpec) -> bool:
        return self._specs.get(name) == spec

    def get(self, name: str, spec: QuantSpec) -> QuantizedWeight:
        tensors = torch.load(self.dir / f"{name}.pt")
        return QuantizedWeight(tensors["w.qweight"], tensors["w.scales"], tensors.get("w.qzeros"), spec)

    def __len__(self) -> int:
        return len(self._specs)


def make_quantizer(name: str, hessians: Mapping[str, torch.Tensor] | None = None, **gptq_options) -> Quantizer:
    """The quantizer called `name` ("gptq" needs the Hessians of the linears it will see)."""
    if name == "rtn":
        return RTNQuantizer()
    if name == "gptq":
        if hessians is None:
            raise PlanError("the gptq quantizer needs calibration Hessians")
        return HessianGPTQ(hessians, **gptq_options)
    raise PlanError(f"unknown quantizer {name!r}; choose one of {', '.join(QUANTIZERS)}")


class Memoized:
    """One quantization per (linear, spec) across all plans of a model: plans at different budgets share most
    (benchmarks quantize dozens of plans of one model)."""

    def __init__(self, quantizer):
        self.quantizer, self.cache = quantizer, {}

    def __call__(self, name, weight, spec):
        if (name, spec) not in self.cache:
            self.cache[name, spec] = self.quantizer(name, weight, spec)
        return self.cache[name, spec]
