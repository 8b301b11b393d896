"""vLLM linear method for moemix-quantized linears (attention, shared experts, dense MLPs)."""

from __future__ import annotations

from collections import Counter

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import GroupQuantScaleParameter, ModelWeightParameter

from vllm_moemix.checkpoint.format import check_stored_tensor
from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.layers.kernels.base import LinearConfig, LinearKernel
from vllm_moemix.layers.kernels.select import choose_linear_kernel
from vllm_moemix.layers.layout import TP_HINT
from vllm_moemix.quant import packing
from vllm_moemix.quant.tensors import SCALE_DTYPE


@register_weight_loader_v2_supported_method
class MoeMixLinearMethod(LinearMethodBase):
    """Parameters follow the checkpoint format 1:1, so vLLM's v2 loaders shard them:
    qweight/scales/qzeros all have K on dim 0 and N on dim 1."""

    def __init__(self, spec: QuantSpec, prefix: str):
        self.spec = spec
        self.prefix = prefix
        self.kernel: LinearKernel | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        spec, k, n = self.spec, input_size_per_partition, sum(output_partition_sizes)
        spec.check_input_dim(k, self.prefix, f" (of {input_size}){TP_HINT}")
        loaded: Counter[str] = Counter()
        base_loader = extra_weight_attrs["weight_loader"]
        # The full (pre-TP) column count is known for an unfused linear; fused shards are checked by vLLM.
        full_n = output_size if len(output_partition_sizes) == 1 else None

        def weight_loader(param, loaded_weight, *args, **kwargs):
            check_stored_tensor(self.prefix, param.moemix_name, loaded_weight, spec, input_size, full_n)
            loaded[param.moemix_name] += 1
            try:
                return base_loader(param, loaded_weight, *args, **kwargs)
            except AssertionError as err:  # vLLM's loaders assert on shape mismatch
                raise PlanError(
                    f"{self.prefix}.{param.moemix_name}: checkpoint tensor of shape {list(loaded_weight.shape)} "
                    f"does not fit this rank's parameter {list(param.shape)} for {spec}"
                ) from err

        tensors = {
            "qweight": (ModelWeightParameter, (packing.packed_rows(k, spec.bits), n), torch.int32),
            "scales": (GroupQuantScaleParameter, (k // spec.group_size, n), SCALE_DTYPE),
        }
        if not spec.sym:
            tensors["qzeros"] = (GroupQuantScaleParameter, (k // spec.group_size, n), torch.uint8)
        for name, (cls, shape, dtype) in tensors.items():
            param = cls(data=torch.empty(shape, dtype=dtype), input_dim=0, output_dim=1, weight_loader=weight_loader)
            param.moemix_name = name
            layer.register_parameter(name, param)
        layer.moemix_loaded = loaded
        layer.moemix_expected_loads = {name: len(output_partition_sizes) for name in tensors}
        self.linear_config = LinearConfig(spec=spec, in_features=k, out_features=n, act_dtype=params_dtype)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        wrong = [
            f"{self.prefix}.{name} ({layer.moemix_loaded[name]} of {want} shards)"
            for name, want in layer.moemix_expected_loads.items()
            if layer.moemix_loaded[name] != want
        ]
        if wrong:
            raise PlanError("moemix checkpoint has missing or duplicate tensors: " + ", ".join(wrong))
        del layer.moemix_loaded, layer.moemix_expected_loads
        kernel_cls = choose_linear_kernel(self.linear_config, layer.qweight.device)
        self.kernel = kernel_cls(self.linear_config)
        self.kernel.process_weights_after_loading(layer)
        layer.moemix_kernel = self.kernel.describe()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)
