"""Pure tensor math: bit packing along K, RTN and GPTQ quantizers, the one dequantization formula.

Imports only `vllm_moemix.config`; knows nothing of files, models or vLLM.
"""
