"""vLLM integration: importing this package registers the `moemix` quantization method."""

from vllm_moemix.layers.config import MoeMixConfig

__all__ = ["MoeMixConfig"]
