"""Raw CUDA IPC for KV pools, through ctypes on the driver library (libcuda.so.1).

    owner:  export(tensor)  -> IpcExport(handle 64 bytes, offset of the tensor in its allocation, allocation size)
            cuMemGetAddressRange(ptr) gives the allocation base (a caching allocator sub-allocates; the
            handle always covers the whole allocation), cuIpcGetMemHandle(base) the handle
    peer:   open_handle(handle) -> base pointer in this process (cuIpcOpenMemHandle, lazy peer access),
            opened once per process and reference-counted here (a second open in one context fails on
            some drivers); close_handle(handle) at shutdown or when the owner's pool is replaced
            device_bytes(ptr, n) wraps mapped memory as a uint8 torch tensor (`__cuda_array_interface__`)

Why raw handles through ctypes rather than torch's `_share_cuda_` / `_new_shared_cuda`: the wire
payload is plain bytes and ints (no pickle), nothing is written to /dev/shm for torch's IPC
reference counting, the mapping is opened and closed exactly when we say (torch caches it behind
a weak reference), and the only dependency is the driver every CUDA machine has: no cupy or
cuda-python on the CPU build or on the GPU machine. Every entry point raises `CudaIpcError` with
the driver's error name; callers fall back to the host-staged path on any of them.

The process must not use expandable segments (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False`,
set by tetri/launch.py before a worker starts): VMM memory cannot be exported this way.

NOT RUN ON A GPU: no GPU was available to the project. On CPU this module only imports; the
`gpu` tests in tests/workers/test_cuda_ipc.py exercise it (tools/gpu_check.sh runs them).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
CU_MEMHOSTREGISTER_PORTABLE = 0x1
ALLOC_CONF = "expandable_segments:False"


class CudaIpcError(RuntimeError):
    pass


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


_lib = None
_lib_lock = threading.Lock()


def _driver():
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise CudaIpcError(f"the CUDA driver library is not loadable: {e}") from e
            u64, p64 = ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)
            lib.cuMemGetAddressRange_v2.argtypes = [p64, ctypes.POINTER(ctypes.c_size_t), u64]
            lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_Handle), u64]
            lib.cuIpcOpenMemHandle_v2.argtypes = [p64, _Handle, ctypes.c_uint]
            lib.cuIpcCloseMemHandle.argtypes = [u64]
            lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
            lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            _lib = lib
    return _lib


def _check(rc: int, what: str) -> None:
    if rc == 0:
        return
    name = ctypes.c_char_p()
    _driver().cuGetErrorName(rc, ctypes.byref(name))
    raise CudaIpcError(f"{what} failed: {(name.value or b'?').decode()} ({rc})")


def _require_context() -> None:
    ctx = ctypes.c_void_p()
    _check(_driver().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        raise CudaIpcError("no current CUDA context on this thread (initialize torch.cuda first)")


@dataclass(frozen=True)
class IpcExport:
    handle: bytes  # 64 bytes
    offset: int  # the tensor's start minus the allocation base
    size: int  # the allocation's size in bytes


def export(ptr: int, nbytes: int) -> IpcExport:
    """The IPC handle of the allocation holding [ptr, ptr + nbytes)."""
    _require_context()
    lib = _driver()
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
    if ptr + nbytes > base.value + size.value:
        raise CudaIpcError(f"the pool [{ptr:#x}, +{nbytes}) runs past its allocation [{base.value:#x}, +{size.value})")
    handle = _Handle()
    try:
        _check(lib.cuIpcGetMemHandle(ctypes.byref(handle), base.value), "cuIpcGetMemHandle")
    except CudaIpcError as e:
        raise CudaIpcError(f"{e}: memory from expandable segments (PYTORCH_CUDA_ALLOC_CONF) or a VMM allocator "
                           "cannot be exported") from e
    return IpcExport(bytes(handle.reserved), ptr - base.value, size.value)


_opened: dict[bytes, list[int]] = {}  # handle -> [base pointer, references]
_opened_lock = threading.Lock()


def open_handle(handle: bytes) -> int:
    """Map a peer's allocation into the current context (once per process); its base pointer."""
    if len(handle) != 64:
        raise CudaIpcError(f"an IPC handle has 64 bytes, got {len(handle)}")
    with _opened_lock:
        entry = _opened.get(handle)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        _require_context()
        h = _Handle()
        ctypes.memmove(h.reserved, handle, 64)
        ptr = ctypes.c_uint64()
        _check(_driver().cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
               "cuIpcOpenMemHandle")
        _opened[handle] = [ptr.value, 1]
        return ptr.value


def close_handle(handle: bytes) -> None:
    with _opened_lock:
        entry = _opened.get(handle)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _opened[handle]
        _check(_driver().cuIpcCloseMemHandle(entry[0]), "cuIpcCloseMemHandle")


def num_open() -> int:
    return len(_opened)


class _DeviceBytes:
    """A `__cuda_array_interface__` view of raw device memory, for torch.as_tensor."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 3}


def device_bytes(ptr: int, nbytes: int):
    """A uint8 tensor over [ptr, ptr + nbytes) of mapped device memory, on the device that holds it
    (not owned: the mapping must outlive it; no device is named, which would copy a peer's memory)."""
    import torch

    return torch.as_tensor(_DeviceBytes(ptr, nbytes))


def host_register(ptr: int, nbytes: int) -> None:
    """Page-lock host memory (a shared-memory mapping) so host<->device copies are asynchronous."""
    _require_context()
    _check(_driver().cuMemHostRegister_v2(ctypes.c_void_p(ptr), nbytes, CU_MEMHOSTREGISTER_PORTABLE),
           "cuMemHostRegister")


def host_unregister(ptr: int) -> None:
    _check(_driver().cuMemHostUnregister(ctypes.c_void_p(ptr)), "cuMemHostUnregister")


def forced_alloc_conf(current: str | None) -> str:
    """PYTORCH_CUDA_ALLOC_CONF with expandable segments off (IPC cannot export them), other
    options kept."""
    opts = [o for o in (current or "").split(",") if o.strip() and not o.strip().startswith("expandable_segments")]
    return ",".join([*opts, ALLOC_CONF])
