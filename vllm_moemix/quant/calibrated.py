"""GPTQ driven by a layer-by-layer calibration pass, as the checkpoint writer's quantizer.

The writer asks for linears in decoder-layer order; this quantizer advances the
calibration one layer at a time and quantizes each linear with that layer's
Hessian, so only one layer's statistics are alive at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_moemix.calibration import LayerStats, LayerwiseModel, calibration_samples, iterate_layers
from vllm_moemix.quant.gptq import gptq_quantize
from vllm_moemix.quant.tensors import QuantizedWeight
from vllm_moemix.spec import QuantSpec


class CalibratedGPTQ:
    name = "gptq"

    def __init__(self, model_dir: str | Path, texts: list[Path], num_samples: int = 32, seq_len: int = 256,
                 damp: float = 0.01, act_order: bool = False, progress: bool = True):
        from transformers import AutoTokenizer

        self.model = LayerwiseModel(model_dir)
        samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), texts, num_samples, seq_len)
        self._layers = iterate_layers(self.model, samples, progress=progress)
        self._current: LayerStats | None = None
        self.damp, self.act_order = damp, act_order

    def _stats_for(self, layer: int) -> LayerStats:
        while self._current is None or self._current.layer < layer:
            _, _, self._current = next(self._layers)
        if self._current.layer != layer:
            raise RuntimeError(f"GPTQ needs linears in layer order; asked for layer {layer} after {self._current.layer}")
        return self._current

    def __call__(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        hessian = self._stats_for(self.model.linears[name].layer).gptq_hessians[name]
        return gptq_quantize(weight, hessian, spec, damp=self.damp, act_order=self.act_order)


class HessianGPTQ:
    """GPTQ with Hessians collected beforehand (e.g. once for many plans of a small model)."""

    name = "gptq"

    def __init__(self, hessians: dict[str, torch.Tensor], damp: float = 0.01, act_order: bool = False):
        self.hessians, self.damp, self.act_order = hessians, damp, act_order

    @classmethod
    def collect(cls, model_dir: str | Path, texts: list[Path], num_samples: int = 32, seq_len: int = 256,
                progress: bool = True, **kwargs) -> HessianGPTQ:
        from transformers import AutoTokenizer

        model = LayerwiseModel(model_dir)
        samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), texts, num_samples, seq_len)
        hessians: dict[str, torch.Tensor] = {}
        for _, _, stats in iterate_layers(model, samples, progress=progress):
            hessians.update(stats.gptq_hessians)
        return cls(hessians, **kwargs)

    def __call__(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
        return gptq_quantize(weight, self.hessians[name], spec, damp=self.damp, act_order=self.act_order)
