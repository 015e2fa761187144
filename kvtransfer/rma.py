"""One-sided puts (UCP RMA) beside ucxx, through ctypes.

ucxx 0.52's Python API has tag, stream and active messages but no RMA. The few libucp calls a
put-based transfer needs are bound here with ctypes, on ucxx's own context, worker and
endpoints (their `handle`s): ucp_mem_map / ucp_rkey_pack (register a pool once, publish its
remote key), ucp_ep_rkey_unpack (a peer's key, per endpoint), ucp_put_nbx (write a local region
into the peer's memory) and ucp_ep_flush_nbx (every put on the endpoint has landed). No C
compiler is needed: the struct offsets below are those of UCX 1.x's public headers (checked by
tests/test_kvtransfer_rma.py against the installed ucp.h when a compiler is there).

Thread safety: ucxx makes its worker UCS_THREAD_MODE_MULTI (`check_worker` asserts it), so puts
posted from the agent's loop thread may race ucxx's progress thread. A flush's completion
callback runs on that progress thread and hands the result to the asyncio loop.
"""
from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import threading

_VP = ctypes.c_void_p
UCS_INPROGRESS = 1
UCS_THREAD_MODE_MULTI = 2
UCS_MEMORY_TYPE_HOST, UCS_MEMORY_TYPE_CUDA = 0, 1
# ucp_mem_map_params_t: field_mask@0 address@8 length@16 flags@24 prot@28 memory_type@32 (48 bytes)
_MAP_FIELDS = 0b11011          # ADDRESS | LENGTH | PROT | MEMORY_TYPE
_PROT_ALL = 0x3 | 0x300        # local read/write, remote read/write
# ucp_request_param_t: op_attr_mask@0 flags@4 request@8 cb@16 datatype@24 user_data@32
# reply_buffer@40 memory_type@48 recv_info@56 memh@64 (72 bytes)
_OP_CALLBACK, _OP_USER_DATA, _OP_MEMH = 1 << 1, 1 << 2, 1 << 8
_SEND_CB = ctypes.CFUNCTYPE(None, _VP, ctypes.c_int, _VP)
_ERR_MIN = (1 << 64) - 100     # UCS_PTR_IS_ERR: a status pointer in [-100, -1]

_lib = None
_lib_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """libucp, the copy ucxx itself loaded (the libucx wheel's), with the prototypes we use."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        import libucx
        libdir = os.path.join(os.path.dirname(libucx.__file__), "lib")
        ucp = None
        for name in ("libucp.so", "libucp.so.0"):   # the one ucxx loaded, never a second copy
            try:
                ucp = ctypes.CDLL(os.path.join(libdir, name), mode=os.RTLD_NOLOAD)
                break
            except OSError:
                continue
        if ucp is None:
            raise RmaError(f"libucp from {libdir} is not loaded (import and initialise ucxx first)")
        sigs = {
            "ucp_worker_query": ([_VP, _VP], ctypes.c_int),
            "ucp_mem_map": ([_VP, _VP, ctypes.POINTER(_VP)], ctypes.c_int),
            "ucp_mem_unmap": ([_VP, _VP], ctypes.c_int),
            "ucp_rkey_pack": ([_VP, _VP, ctypes.POINTER(_VP), ctypes.POINTER(ctypes.c_size_t)],
                              ctypes.c_int),
            "ucp_rkey_buffer_release": ([_VP], None),
            "ucp_ep_rkey_unpack": ([_VP, _VP, ctypes.POINTER(_VP)], ctypes.c_int),
            "ucp_rkey_destroy": ([_VP], None),
            "ucp_put_nbx": ([_VP, _VP, ctypes.c_size_t, ctypes.c_uint64, _VP, _VP], _VP),
            "ucp_ep_flush_nbx": ([_VP, _VP], _VP),
            "ucp_request_free": ([_VP], None),
            "ucs_status_string": ([ctypes.c_int], ctypes.c_char_p),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(ucp, name)
            fn.argtypes, fn.restype = args, res
        _lib = ucp
        return ucp


class RmaError(RuntimeError):
    pass


def _status_text(status: int) -> str:
    return lib().ucs_status_string(status).decode(errors="replace")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RmaError(f"{what} failed: {_status_text(status)} ({status})")


def _ptr_status(ptr: int | None) -> int | None:
    """A ucs_status_ptr_t: None when done, a negative status on error, else 1 (in progress)."""
    if not ptr:
        return None
    if ptr >= _ERR_MIN:
        return ptr - (1 << 64)
    return UCS_INPROGRESS


def check_worker(worker_handle: int) -> None:
    """Refuse a worker that is not thread-multi (puts come from a thread other than UCX's
    progress thread)."""
    attr = (ctypes.c_uint8 * 256)()
    ctypes.c_uint64.from_buffer(attr, 0).value = 1          # UCP_WORKER_ATTR_FIELD_THREAD_MODE
    _check(lib().ucp_worker_query(worker_handle, attr), "ucp_worker_query")
    mode = ctypes.c_int.from_buffer(attr, 8).value
    if mode != UCS_THREAD_MODE_MULTI:
        raise RmaError(f"the UCX worker is not thread-multi (mode {mode}): puts from the agent's "
                       "loop would race the progress thread")


class Registration:
    """Local memory registered once with the UCP context (ucp_mem_map), and its packed rkey."""

    def __init__(self, context_handle: int, ptr: int, nbytes: int, cuda: bool) -> None:
        self.ptr, self.nbytes, self.cuda = int(ptr), int(nbytes), cuda
        self._ctx = context_handle
        p = (ctypes.c_uint8 * 48)()
        ctypes.c_uint64.from_buffer(p, 0).value = _MAP_FIELDS
        ctypes.c_uint64.from_buffer(p, 8).value = self.ptr
        ctypes.c_uint64.from_buffer(p, 16).value = self.nbytes
        ctypes.c_uint32.from_buffer(p, 28).value = _PROT_ALL
        ctypes.c_int.from_buffer(p, 32).value = UCS_MEMORY_TYPE_CUDA if cuda else UCS_MEMORY_TYPE_HOST
        self.memh = _VP()
        _check(lib().ucp_mem_map(context_handle, p, ctypes.byref(self.memh)), "ucp_mem_map")
        buf, size = _VP(), ctypes.c_size_t()
        _check(lib().ucp_rkey_pack(context_handle, self.memh, ctypes.byref(buf), ctypes.byref(size)),
               "ucp_rkey_pack")
        self.packed = ctypes.string_at(buf, size.value)
        lib().ucp_rkey_buffer_release(buf)

    def info(self) -> dict:
        """What a peer needs to write here (JSON-able)."""
        return {"addr": self.ptr, "nbytes": self.nbytes, "rkey": self.packed.hex()}

    def close(self) -> None:
        if self.memh:
            lib().ucp_mem_unmap(self._ctx, self.memh)
            self.memh = _VP()


class RemoteRegion:
    """A peer's registered region, its rkey unpacked on our endpoint to that peer."""

    def __init__(self, ep_handle: int, info: dict) -> None:
        self.addr, self.nbytes = int(info["addr"]), int(info["nbytes"])
        self.num_blocks = int(info.get("num_blocks", 0))   # the peer's KV pool layout
        packed = bytes.fromhex(info["rkey"])
        self._buf = ctypes.create_string_buffer(packed, len(packed))
        self.rkey = _VP()
        _check(lib().ucp_ep_rkey_unpack(ep_handle, self._buf, ctypes.byref(self.rkey)),
               "ucp_ep_rkey_unpack")

    def destroy(self) -> None:
        if self.rkey:
            lib().ucp_rkey_destroy(self.rkey)
            self.rkey = _VP()


class Putter:
    """Posts puts from one local registration (its memh passed to UCX: no lookup per put)."""

    def __init__(self, local: Registration) -> None:
        self.local = local
        self._param = (ctypes.c_uint8 * 72)()
        ctypes.c_uint32.from_buffer(self._param, 0).value = _OP_MEMH
        ctypes.c_uint64.from_buffer(self._param, 64).value = local.memh.value or 0
        self._put = lib().ucp_put_nbx
        self._free = lib().ucp_request_free

    def put(self, ep_handle: int, src_off: int, nbytes: int, remote: RemoteRegion, dst_off: int) -> None:
        """Write local[src_off : src_off + nbytes] to remote[dst_off ...]. Completion is known
        only through a later `flush` of the endpoint: the request is released at once."""
        if src_off < 0 or dst_off < 0 or src_off + nbytes > self.local.nbytes \
                or dst_off + nbytes > remote.nbytes:
            raise RmaError(f"put out of bounds: local {src_off}+{nbytes} of {self.local.nbytes}, "
                           f"remote {dst_off}+{nbytes} of {remote.nbytes}")
        req = self._put(ep_handle, self.local.ptr + src_off, nbytes, remote.addr + dst_off,
                        remote.rkey, self._param)
        st = _ptr_status(req)
        if st is None:
            return
        if st < 0:
            raise RmaError(f"ucp_put_nbx failed: {_status_text(st)} ({st})")
        self._free(req)   # released now, completed by UCX later; `flush` tells us when


_flushes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
_flush_ids = itertools.count(1)


@_SEND_CB
def _flush_done(request, status, user_data):   # on UCX's progress thread
    entry = _flushes.pop(int(user_data or 0), None)
    if request:
        lib().ucp_request_free(request)
    if entry is None:
        return
    loop, fut = entry
    settle_threadsafe(loop, fut, status, None, lambda why: RmaError(f"ucp_ep_flush_nbx failed: {why}"))


def settle_threadsafe(loop, fut, status: int, result, error) -> None:
    """From UCX's progress thread: resolve `fut` on its loop with `result` (status UCS_OK) or
    the exception `error("<status text> (<status>)")`; nothing if the loop has closed first
    (agent shutdown: nobody is waiting)."""
    def settle():
        if fut.done():
            return
        if status == 0:
            fut.set_result(result)
        else:
            fut.set_exception(error(f"{_status_text(status)} ({status})"))
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


def flush(ep_handle: int) -> asyncio.Future:
    """A future (of the running loop) that resolves once every put posted on the endpoint so far
    has completed at the peer."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fid = next(_flush_ids)
    _flushes[fid] = (loop, fut)
    param = (ctypes.c_uint8 * 72)()
    ctypes.c_uint32.from_buffer(param, 0).value = _OP_CALLBACK | _OP_USER_DATA
    ctypes.c_void_p.from_buffer(param, 16).value = ctypes.cast(_flush_done, _VP).value
    ctypes.c_uint64.from_buffer(param, 32).value = fid
    st = _ptr_status(lib().ucp_ep_flush_nbx(ep_handle, param))
    if st is None or st < 0:
        _flushes.pop(fid, None)
        if st is None:
            fut.set_result(None)
        else:
            fut.set_exception(RmaError(f"ucp_ep_flush_nbx failed: {_status_text(st)} ({st})"))
    return fut
