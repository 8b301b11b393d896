"""GPTQ fed by calibration Hessians, for the checkpoint writer.

`CalibratedGPTQ` streams: the writer asks for linears in decoder-layer order and
the quantizer advances a layer-by-layer calibration pass alongside, so only one
layer's statistics are alive at once. `collect_hessians` keeps them all
(useful when one small model is quantized under many plans).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_moemix.calibration.layerwise import LayerStats, LayerwiseModel, calibration_samples, iterate_layers
from vllm_moemix.quant.quantizers import HessianGPTQ


def _layers(model_dir: str | Path, texts: list[Path], num_samples: int, seq_len: int, progress: bool):
    from transformers import AutoTokenizer

    model = LayerwiseModel(model_dir)
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), texts, num_samples, seq_len)
    return model, iterate_layers(model, samples, progress=progress)


def collect_hessians(
    model_dir: str | Path,
    texts: list[Path],
    num_samples: int = 32,
    seq_len: int = 256,
    progress: bool = True,
    **gptq_options,
) -> HessianGPTQ:
    """One calibration pass, every linear's Hessian kept: GPTQ for many plans of one small model."""
    _, layers = _layers(model_dir, texts, num_samples, seq_len, progress)
    hessians: dict[str, torch.Tensor] = {}
    for _, _, stats in layers:
        hessians.update(stats.gptq_hessians)
    return HessianGPTQ(hessians, **gptq_options)


class CalibratedGPTQ(HessianGPTQ):
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
    ):
        super().__init__({}, damp, act_order, clip_search)
        self.model, self._layers = _layers(model_dir, texts, num_samples, seq_len, progress)
        self._current: LayerStats | None = None

    def hessian(self, name: str) -> torch.Tensor:
        layer = self.model.linears[name].layer
        while self._current is None or self._current.layer < layer:
            _, _, self._current = next(self._layers)
        if self._current.layer != layer:
            raise RuntimeError(
                f"GPTQ needs linears in layer order; asked for layer {layer} after {self._current.layer}"
            )
        return self._current.gptq_hessians[name]
