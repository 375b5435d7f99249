"""A minimal ctypes wrapper around NVRTC, the CUDA runtime compiler, for compiling kernels without a GPU.

NVRTC compiles CUDA C to PTX on the CPU alone (no GPU, no driver): the ``nvidia-cuda-nvrtc-cu12``
wheel ships ``libnvrtc.so.12`` and its builtins library under ``nvidia/cuda_nvrtc/lib``. Only the
tests use this; the worker compiles its kernels through CuPy.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from dataclasses import dataclass

_NVRTC_SUCCESS = 0


class NvrtcUnavailable(RuntimeError):
    """libnvrtc could not be found or loaded."""


@dataclass
class CompileResult:
    ok: bool
    status: str  # nvrtcGetErrorString of nvrtcCompileProgram's result
    log: str
    ptx: str


def _candidate_dirs() -> list[str]:
    dirs = []
    try:
        import nvidia.cuda_nvrtc as pkg  # the wheel's (namespace) package
        dirs += [os.path.join(p, "lib") for p in getattr(pkg, "__path__", [])]
    except ImportError:
        pass
    for site in sys.path:  # fallback: a plain site-packages layout
        d = os.path.join(site, "nvidia", "cuda_nvrtc", "lib")
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def _load() -> ctypes.CDLL:
    tried = []
    for d in _candidate_dirs():
        path = os.path.join(d, "libnvrtc.so.12")
        if not os.path.exists(path):
            tried.append(f"{path} (missing)")
            continue
        try:
            # libnvrtc dlopens its builtins library; load it first from the same folder so it is found.
            for builtins in sorted(glob.glob(os.path.join(d, "libnvrtc-builtins.so.*"))):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
    raise NvrtcUnavailable("cannot load libnvrtc.so.12 from the nvidia-cuda-nvrtc-cu12 wheel "
                           "(pip install -e '.[test]'); tried: " + ("; ".join(tried) or "no nvidia/cuda_nvrtc/lib"))


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded libnvrtc (NvrtcUnavailable when it cannot be loaded)."""
    global _lib
    if _lib is None:
        nv = _load()
        prog_p = ctypes.POINTER(ctypes.c_void_p)
        nv.nvrtcGetErrorString.restype = ctypes.c_char_p
        nv.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        nv.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        nv.nvrtcCreateProgram.argtypes = [prog_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
        nv.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        nv.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        nv.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        nv.nvrtcGetPTXSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        nv.nvrtcGetPTX.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        nv.nvrtcDestroyProgram.argtypes = [prog_p]
        for name in ("nvrtcVersion", "nvrtcCreateProgram", "nvrtcCompileProgram", "nvrtcGetProgramLogSize",
                     "nvrtcGetProgramLog", "nvrtcGetPTXSize", "nvrtcGetPTX", "nvrtcDestroyProgram"):
            getattr(nv, name).restype = ctypes.c_int
        _lib = nv
    return _lib


def _check(result: int, what: str) -> None:
    if result != _NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {lib().nvrtcGetErrorString(result).decode()}")


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) CUDA version."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def compile_source(source: str, arch: str, name: str = "kernel.cu", options: tuple[str, ...] = ()) -> CompileResult:
    """Compile CUDA C ``source`` to PTX for virtual architecture ``arch`` (e.g. "compute_80")."""
    nv = lib()
    prog = ctypes.c_void_p()
    _check(nv.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        result = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        _check(nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        _check(nv.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        ptx = ""
        if result == _NVRTC_SUCCESS:
            _check(nv.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            pbuf = ctypes.create_string_buffer(size.value)
            _check(nv.nvrtcGetPTX(prog, pbuf), "nvrtcGetPTX")
            ptx = pbuf.value.decode(errors="replace")
        return CompileResult(result == _NVRTC_SUCCESS, nv.nvrtcGetErrorString(result).decode(), log, ptx)
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))
