"""Array-module selection: NumPy on the CPU, CuPy on a GPU, and the host copies between them.

Model and kernel code takes the module as its first argument (``xp``) and never imports
CuPy itself, so everything here runs, and is tested, without a GPU.
"""

from __future__ import annotations

import threading

import numpy as np


def is_cupy(xp) -> bool:
    """Whether ``xp`` is the CuPy module (without importing CuPy)."""
    return getattr(xp, "__name__", "") == "cupy"


def get_xp(device: str):
    """The array module for ``device``: numpy for "cpu"; cupy for "gpu" / "gpu:N", with GPU N made current."""
    if device == "cpu":
        return np
    if device == "gpu" or device.startswith("gpu:"):
        index_text = device[4:] if device.startswith("gpu:") else "0"
        if not index_text.isdigit():
            raise ValueError(f"unknown device '{device}': expected 'cpu', 'gpu' or 'gpu:N' with N a GPU index")
        index = int(index_text)
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # ImportError, or CUDARuntimeError when there is no driver
            raise RuntimeError(f"device '{device}' needs cupy and a CUDA GPU: {type(e).__name__}: {e}") from None
        if index >= count:
            raise RuntimeError(f"device '{device}' needs cupy and a CUDA GPU: "
                               f"GPU {index} asked for, {count} visible")
        cupy.cuda.Device(index).use()
        return cupy
    raise ValueError(f"unknown device '{device}': expected 'cpu', 'gpu' or 'gpu:N'")


def to_numpy(a) -> np.ndarray:
    """A NumPy array with the values of ``a`` (a NumPy or CuPy array, or anything array-like)."""
    if hasattr(a, "get") and not isinstance(a, np.ndarray):
        return a.get()
    return np.asarray(a)


def asarray(xp, a, dtype=None):
    """``a`` as an array of module ``xp`` (copying to or from the device as needed)."""
    if not is_cupy(xp) and not isinstance(a, np.ndarray):
        a = to_numpy(a)
    return xp.asarray(a, dtype=dtype)


def make_rng(xp, seed: int):
    """A random generator of module ``xp`` seeded with ``seed`` (used for dropout masks)."""
    return xp.random.default_rng(int(seed))


_pinned: dict[str, np.ndarray] = {}
_pinned_lock = threading.Lock()


def _pinned_buffer(key: str, nbytes: int) -> np.ndarray:
    import cupyx
    buf = _pinned.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = cupyx.empty_pinned((max(nbytes, 1),), dtype=np.uint8)
        _pinned[key] = buf
    return buf


def release_pinned() -> None:
    """Drop the page-locked buffers (a worker moving on to another job's tensors)."""
    with _pinned_lock:
        _pinned.clear()


def pinned_to_host(xp, arrays: dict, slot: int = 0) -> dict:
    """Copy a dict of device arrays to host NumPy arrays through reused page-locked buffers.

    The copies are queued on a copy stream after the work queued so far on the current stream,
    and waited for once, together. The returned arrays are views into buffers of ``slot`` that the
    next call with the same slot overwrites: a caller that hands a step's copies to another thread
    alternates slots. On NumPy the arrays are returned as they are.
    """
    if not is_cupy(xp):
        return arrays
    out = {}
    with _pinned_lock:
        stream = _copy_stream(xp)
        stream.wait_event(xp.cuda.get_current_stream().record())
        for name, a in arrays.items():
            a = xp.ascontiguousarray(a)
            buf = _pinned_buffer(f"{slot}/{name}", a.nbytes)
            host = buf[:a.nbytes].view(a.dtype).reshape(a.shape)
            xp.asnumpy(a, stream=stream, out=host, blocking=False)  # pinned: a DMA copy, no staging
            out[name] = host
        stream.synchronize()
    return out


def empty_host(xp, shape, dtype) -> np.ndarray:
    """A host array to receive what goes to the device next: page-locked with CuPy, so that
    ``xp.asarray`` of it is an asynchronous DMA on the current stream; plain NumPy otherwise."""
    if not is_cupy(xp):
        return np.empty(shape, dtype)
    import cupyx
    return cupyx.empty_pinned(shape, dtype)


_copy_streams: dict[int, object] = {}


def _copy_stream(xp):
    """This device's stream for device-to-host copies (non-blocking: it never waits on the default one)."""
    dev = xp.cuda.Device().id
    stream = _copy_streams.get(dev)
    if stream is None:
        stream = _copy_streams[dev] = xp.cuda.Stream(non_blocking=True)
    return stream
