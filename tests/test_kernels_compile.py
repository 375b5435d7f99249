"""Every CUDA kernel the worker can launch compiles, for compute_80 and compute_90, without a GPU.

NVRTC (the ``nvidia-cuda-nvrtc-cu12`` wheel, loaded with ctypes by tests/nvrtc.py) compiles each
source of ``kernels.cuda_sources()`` to PTX on the CPU: the very text the CuPy path builds its
``RawKernel``\\ s from. Where libnvrtc cannot be loaded the tests fail under CI (CI set) and are
skipped, with the reason shown, elsewhere.
"""

from __future__ import annotations

import os

import nvrtc
import pytest

from ps.worker import kernels

ARCHS = ["compute_80", "compute_90"]
SOURCES = kernels.cuda_sources()


@pytest.fixture(scope="module")
def nv():
    try:
        nvrtc.lib()
    except nvrtc.NvrtcUnavailable as e:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set but NVRTC is unavailable, so no CUDA kernel can be compile-checked: {e}",
                        pytrace=False)
        pytest.skip(f"NVRTC unavailable: {e}")
    return nvrtc


def test_the_sources_cover_every_kernel_variant():
    # 2 dtypes x (5 activations x (forward with bias, forward without, backward) + softmax, bce, im2col, col2im)
    assert len(SOURCES) == len(kernels.KERNEL_DTYPES) * (len(kernels.ACTIVATIONS) * 3 + 5)
    for name, source in SOURCES.items():
        assert f'extern "C" __global__ void {name}(' in source, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_kernel_compiles(nv, name, arch):
    result = nv.compile_source(SOURCES[name], arch, name=f"{name}.cu")
    assert result.ok, f"{name} does not compile for {arch} ({result.status}):\n{result.log}\n--- source:\n" \
                      f"{SOURCES[name]}"
    assert f".entry {name}(" in result.ptx, f"{name}: no such entry point in the PTX"


@pytest.mark.parametrize("arch", ARCHS)
def test_the_checker_fails_on_a_broken_kernel(nv, arch):
    broken = SOURCES["ps_relu_forward_float32"].replace("y_[i] = y;", "y_[i] = y + ps_no_such_identifier;")
    assert broken != SOURCES["ps_relu_forward_float32"]
    result = nv.compile_source(broken, arch, name="broken.cu")
    assert not result.ok, "NVRTC accepted a kernel with an undefined identifier"
    assert result.status == "NVRTC_ERROR_COMPILATION", result.status
    assert "ps_no_such_identifier" in result.log and "undefined" in result.log, result.log
