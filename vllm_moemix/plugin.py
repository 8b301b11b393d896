"""Entry point of group `vllm.general_plugins`: vLLM calls `register` in every process.

Importing `vllm_moemix.layers` registers the `moemix` quantization config and
the `moemix::` torch ops; Python's import cache makes repeated calls no-ops.
"""


def register() -> None:
    import vllm_moemix.layers  # noqa: F401
