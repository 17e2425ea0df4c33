"""What the hand-written CUDA GEMVs share (`cuda_int`: 2- to 4-bit codes; `cuda_frag`: the k-quants' fragment layout;
`cuda_rows`: row-major 8-bit codes): the device helpers every kernel source starts with (`PRELUDE`), compiling each
variant with NVRTC once per device, and the launch, plain or with programmatic dependent launch (PDL) inside CUDA
graphs.

PDL: a GEMV captured right after another kernel goes out with cuLaunchKernelEx and the programmatic-serialization
attribute. It starts while that kernel still runs, requests its weights and scales (constants), and waits
(griddepcontrol.wait) before it reads anything a producer wrote, which it reads through L2 (`ld_fresh`). Found in
the SASS (`tests/test_pdl_load_order.py`): ptxas schedules the wait (ACQBULK) above the weight loads written
before it, so they would go out only once the producer has finished; a second launch_dependents just before the
wait pins them ahead (q4 frames +6.5% on an H100; S2CONV_PDL_FENCE=0 leaves it out, for comparisons). Each GEMV
lets its successor launch first thing (griddepcontrol.launch_dependents), and so do the Triton kernels on Hopper
(`launch.pdl_args`, PDL 2). Only after a kernel node: griddepcontrol.wait waits for prerequisite *grids*, so after
a copy or memset node (torch's copy_ of a token, a zeroed buffer) the GEMV would read x before it is written.
Eager launches stay plain.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from s2conv.errors import RuntimeModelError

log = logging.getLogger(__name__)

# x, y and the residual are the activations' 16-bit dtype: bf16, or fp16 with XF16; PDL switches the PDL helpers on
PRELUDE = r"""
typedef unsigned short u16;

__device__ __forceinline__ float x_to_f(u16 v) {
#if XF16
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
#else
    return __uint_as_float(((unsigned)v) << 16);
#endif
}
__device__ __forceinline__ u16 f_to_x(float f) {
    u16 h;
#if XF16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ float half_to_f(u16 v) {  // an fp16 scale (HALF_S)
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
}
__device__ __forceinline__ int dp2a_lo(int a, unsigned b, int c) {
    int d; asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ int dp2a_hi(int a, unsigned b, int c) {
    int d; asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ int4 ld_stream(const int4* p) {  // read once: keep it out of L1
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ int2 ld_stream(const int2* p) {
    int2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.s32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
// what the previous kernel wrote (x, the residual, rs_in), read through L2 only: under PDL this grid started before
// that kernel finished, and a read-only-cache load (what `const __restrict__` compiles to) returned stale values
__device__ __forceinline__ u16 ld_fresh(const u16* p) { return __ldcg(p); }
__device__ __forceinline__ int4 ld_fresh(const int4* p) { return __ldcg(p); }
__device__ __forceinline__ float ld_fresh(const float* p) { return __ldcg(p); }
// programmatic dependent launch (sm_90+): both are no-ops unless the launch asked for it (`_launch_pdl`)
__device__ __forceinline__ void pdl_launch_dependents() {
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if PDL
#if PDL_FENCE
    // without this, ptxas schedules the wait (ACQBULK) above every load of the constants before it, so they would
    // go out only after the producer finished; a second launch_dependents (idempotent) keeps them ahead. (A
    // no-instruction fence.acquire.sync_restrict::shared::cluster.cluster orders them too, but measured slower.)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
"""

# the end of every GEMV kernel, inside warp 0's `if (live) {` for output row row0 + lane once t[] holds the row's
# finished sums (t[1]: w3's when GATED), with `float o = 0.f` declared before it: silu(w1) * w3 when gated,
# rounding, + residual (rounded again, as eager h + linear(x)), the store; GX: the output times the next norm's
# weight too; SS: the sum of squares of warp 0's outputs, added to ss_out. It closes the `if` and the kernel.
STORE_ROWS = r"""#if GATED
        o = t[0] / (1.f + __expf(-t[0])) * t[1];
#else
        o = t[0];
#endif
        o = x_to_f(f_to_x(o));
#if HAS_RES
        o = x_to_f(f_to_x(o + x_to_f(ld_fresh(res + row0 + lane))));
#endif
        y[row0 + lane] = f_to_x(o);
#if GX
        gx_buf[row0 + lane] = f_to_x(o * x_to_f(gx_g[row0 + lane]));
#endif
    }
#if SS
    float o2 = o * o;
#pragma unroll
    for (int d = 16; d; d >>= 1) o2 += __shfl_xor_sync(0xffffffffu, o2, d);
    if (lane == 0) atomicAdd(ss_out, o2);
#endif
}
"""

_FAILED: set = set()
_WARNED: set = set()  # S2CONV_PDL_FENCE values already warned about


def flags_source(flags: dict, source: str) -> str:
    """A kernel source with its compile-time flags as #defines (booleans as 0 / 1) and the prelude; PDL_FENCE (the
    ordering before the PDL wait, `pdl_wait`) from S2CONV_PDL_FENCE, default 1 (0 leaves it out, for comparisons;
    read when a variant first compiles: kernels compiled before a change of the variable keep the old value)."""
    value = os.environ.get("S2CONV_PDL_FENCE", "1")
    if value not in ("0", "1") and value not in _WARNED:
        _WARNED.add(value)
        log.warning("S2CONV_PDL_FENCE=%r is not 0 or 1: taken as 1", value)
    fence = {"PDL_FENCE": value != "0"}
    return "".join(f"#define {k} {int(v)}\n" for k, v in {**fence, **flags}.items()) + PRELUDE + source


def available(x: torch.Tensor) -> bool:
    """Whether a CUDA GEMV can take x: one row of bf16/fp16 on a CUDA GPU of compute capability 8.0 or later, with
    torch's NVRTC wrapper, unless S2CONV_CUDA_GEMV=0 (or a compilation failed on this device before)."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("S2CONV_CUDA_GEMV", "1") != "0" and hasattr(torch.cuda, "_compile_kernel")
            and x.device not in _FAILED and capability(x.device) >= 8)


def failed(device: torch.device) -> None:
    """Note that compiling failed on `device` (no NVRTC, an unsupported GPU): its GEMVs stay on Triton."""
    _FAILED.add(device)


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


# ---- programmatic dependent launch (PDL) inside CUDA graphs (see the module's notes) --------------------------------
class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_KERNEL_NODE = 0  # CU_GRAPH_NODE_TYPE_KERNEL
_CAPTURE_ACTIVE = 1  # CU_STREAM_CAPTURE_STATUS_ACTIVE


def pdl_capable(device: torch.device) -> bool:
    """Whether GEMVs on `device` carry the PDL prologue: compute capability 9.0 or later (griddepcontrol), the
    driver entry points found, unless S2CONV_CUDA_PDL=0."""
    return (os.environ.get("S2CONV_CUDA_PDL", "1") != "0" and capability(device) >= 9 and _driver() is not None)


@functools.lru_cache(maxsize=None)
def _driver():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx, lib.cuStreamGetCaptureInfo_v2, lib.cuGraphNodeGetType  # noqa: B018 (present?)
    except (OSError, AttributeError):
        return None
    return lib


def after_kernel(stream: int) -> bool:
    """Whether `stream` is capturing and everything the next node depends on is a kernel node."""
    lib = _driver()
    if lib is None:
        return False
    status, graph, n = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_size_t()
    capture_id, deps = ctypes.c_uint64(), ctypes.POINTER(ctypes.c_void_p)()
    if lib.cuStreamGetCaptureInfo_v2(ctypes.c_void_p(stream), ctypes.byref(status), ctypes.byref(capture_id),
                                     ctypes.byref(graph), ctypes.byref(deps), ctypes.byref(n)) != 0:
        return False
    if status.value != _CAPTURE_ACTIVE or n.value == 0:
        return False
    kind = ctypes.c_int()
    for i in range(n.value):
        if lib.cuGraphNodeGetType(ctypes.c_void_p(deps[i]), ctypes.byref(kind)) != 0 or kind.value != _KERNEL_NODE:
            return False
    return True


def _c_arg(a):
    if isinstance(a, torch.Tensor):
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, int):
        return ctypes.c_int(a)
    if isinstance(a, float):
        return ctypes.c_double(a)
    raise TypeError(f"unsupported kernel argument type: {type(a).__name__}")


def _launch_pdl(kernel, grid: tuple, threads: int, shared: int, args: list, stream: int) -> None:
    """kernel(args) with the programmatic-serialization attribute (cuLaunchKernelEx); args as torch's wrapper
    marshals them: tensors as pointers, ints as int, floats as double."""
    held = [_c_arg(a) for a in args]
    params = (ctypes.c_void_p * len(held))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in held])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(threads, 1, 1), shared,
                           ctypes.c_void_p(stream), ctypes.pointer(attr), 1)
    err = _driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {err}")


class CudaGemv:
    """A kernel in the form `launch.launch` takes (so that a dry run notes it and compiling ahead compiles it):
    GEMV[grid](variant, threads, shared bytes, *kernel args) runs it, GEMV.warmup(variant, ..) compiles it. A
    variant has `source()` (what `flags_source` gives) and `pdl` (whether the source has the PDL helpers on)."""

    def __init__(self, name: str):
        self.__name__ = name
        self._kernels: dict = {}  # (variant, device index) -> compiled kernel

    def kernel(self, variant):
        """The kernel of `variant` compiled by NVRTC (torch.cuda._compile_kernel) on first use and loaded into the
        current GPU's context (where the launch runs, as for the Triton kernels): cached per variant and device."""
        key = (variant, torch.cuda.current_device())
        k = self._kernels.get(key)
        if k is None:
            k = self._kernels[key] = torch.cuda._compile_kernel(variant.source(), self.__name__,
                                                                 nvcc_options=["--std=c++17"])
        return k

    def __getitem__(self, grid: tuple):
        def run(variant, threads: int, shared: int, *args) -> None:
            kernel = self.kernel(variant)
            if variant.pdl:
                stream = torch.cuda.current_stream().cuda_stream
                if after_kernel(stream):
                    _launch_pdl(kernel, grid, threads, shared, list(args), stream)
                    return
            kernel(grid=grid, block=(threads, 1, 1), shared_mem=shared, args=list(args))
        return run

    def warmup(self, variant, *args, grid=None, **kwargs) -> None:
        try:
            self.kernel(variant)
        except Exception as e:  # noqa: BLE001  (the launch itself reports it, and falls back to Triton)
            log.warning("CUDA GEMV %s: compiling ahead failed: %s", self.__name__, e)

    def check(self, variant, device: torch.device) -> None:
        """Compile `variant` now (outside a dry run), or raise RuntimeModelError and keep `device` on Triton."""
        try:
            self.kernel(variant)
        except Exception as e:  # noqa: BLE001  (no NVRTC, an unsupported GPU: the Triton kernel instead)
            failed(device)
            raise RuntimeModelError(f"CUDA GEMV {self.__name__} unavailable on {device}: {e}") from e
