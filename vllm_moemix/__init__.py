"""vllm_moemix: serve Mixture-of-Experts models whose experts have different bit widths, in vLLM.

Flow: plan (which linear gets which width) -> quantize -> safetensors checkpoint
-> vLLM quantization method `moemix` -> server.
"""

__version__ = "0.1.0"
