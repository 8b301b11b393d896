"""Entry point of group `vllm.general_plugins`: vLLM calls `register` in every process.

Importing `vllm_moemix.layers` registers the `moemix` quantization config and
the `moemix::` torch ops; Python's import cache makes repeated calls no-ops.
The method relies on vLLM internals of one minor release (RoutedExperts, the MoE
weight-loader signature, maybe_update_config), so another vLLM is refused here
with one line instead of failing deep inside a model load.
"""

from packaging.version import Version

SUPPORTED_VLLM = (Version("0.32"), Version("0.33"))  # [min, max): keep in step with pyproject's extras


def check_vllm_version(installed: str) -> None:
    low, high = SUPPORTED_VLLM
    if not low <= Version(Version(installed).base_version) < high:  # base_version: 0.32.1.dev3+cpu -> 0.32.1
        raise RuntimeError(
            f"vllm_moemix supports vLLM >={low},<{high}; this environment has vLLM {installed}. "
            f"Install a matching vLLM (pip install 'vllm>={low},<{high}') or a moemix built for yours."
        )


def register() -> None:
    import vllm

    check_vllm_version(vllm.__version__)
    import vllm_moemix.layers  # noqa: F401
