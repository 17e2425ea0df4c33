"""How the kernels are launched: programmatic dependent launch (PDL) on Hopper and later GPUs, and `launch`, which
every launcher goes through so that a dry run can note launches and compile their kernels ahead (below).

Inside a CUDA graph every kernel normally waits for the previous one to finish and drain before its programs even
start. A kernel launched with PDL starts while its predecessor is still running: its programs wait at `gdc_wait`
until the predecessor's writes are visible (`kernels.common.pdl_start`). Each kernel also calls
`gdc_launch_dependents` first thing, so that the next one can be scheduled as soon as all of its own programs are
running.

Rules for a kernel with a PDL flag: before `gdc_wait` it reads only constant tensors (weights, scales) and writes
nothing; both calls are no-ops when the launch did not ask for PDL.

Off by default: measured on an H200 (bench/RESULTS.md, when the integer GEMV also requested its first block before
the wait), whole frames got slower with it (q4 5.38 -> 6.05 ms, fp8 5.49 -> 7.00 ms) although single GEMVs at
their best configs got a little faster. On an H100 (fourth session in bench/RESULTS.md) other placements (waiting
first, then letting the next kernel launch; waiting only; either with an L2 prefetch of the integer GEMV's first
weight blocks before the wait) moved whole frames by no more than the run-to-run spread; in the eighth session
every format got slower with it (bf16 146.5 -> 133.2, q2 241 -> 199 frames/s); in the eleventh, with every kernel
waiting before it let the next one launch and the float GEMV loading its first weight tiles before its wait, fp8
still lost 7% on an H200 (251.5 -> 233.8). `S2CONV_PDL=1` turns it on.

What does pay: the CUDA GEMVs (`cuda_common`) go out with PDL after a kernel, and on Hopper every Triton kernel
lets its successor launch first thing without waiting itself (PDL 2 in `pdl_args`): q4 frames 311.8 / 313.3 ->
317.9 / 317.9 on an H100 (bench/RESULTS.md, nineteenth session). `S2CONV_PDL_TRIGGER=0` leaves that out.

And the decode attention goes out with PDL inside graphs (`launch_early`, PDL 3): it requests the cached keys and
values of earlier positions, which no kernel since the frame's (or fast pass's) last plain launch writes, while the
qkv projection still runs, and waits only before it reads the projection. q4 frames 328.5 / 329.1 -> 340.2 /
340.3, fp8 237.0 -> 242.2 / 242.0 on an H100 (twenty-third session; `S2CONV_EARLY_PDL=0` for the old launch).
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_CAPABLE: dict[torch.device, bool] = {}
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # counter buffers outgrown: CUDA graphs captured before may still use them


def counters(device: torch.device, n: int) -> torch.Tensor:
    """>= n int32 arrival counters, zero between launches (the split-K GEMVs and the split attention: the last
    program of each tile or head resets its own).

    One buffer per device, allocated once outside CUDA-graph capture (a capture that needs a bigger one gets a
    zeroed buffer of its own: a memset node). Launches that share it must run one at a time (one stream).
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        fresh = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return fresh
        if buf is not None:
            _RETIRED.append(buf)  # never freed: a kept graph (the frame loop's) holds its address
        _COUNTERS[device] = buf = fresh
    return buf


def _hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability >= 9.0 (griddepcontrol), not under triton's interpreter."""
    if device.type != "cuda" or _INTERPRETED:
        return False
    ok = _CAPABLE.get(device)
    if ok is None:
        ok = _CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return ok


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL: S2CONV_PDL=1 on a `_hopper` device."""
    return os.environ.get("S2CONV_PDL", "0") == "1" and _hopper(device)


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch with a `PDL` constexpr flag (`common.pdl_start`): PDL=1 and launch_pdl
    when PDL is on for the Triton kernels; else PDL=2 on sm_90+ (the kernel only lets its successor launch early,
    for the CUDA GEMVs that go out with PDL: `cuda_int`), unless S2CONV_PDL_TRIGGER=0; else PDL=0."""
    if pdl_enabled(device):
        return {"PDL": 1, "launch_pdl": True}
    return {"PDL": 2 if os.environ.get("S2CONV_PDL_TRIGGER", "1") != "0" and _hopper(device) else 0}


def early_pdl(device: torch.device, switch: str = "S2CONV_EARLY_PDL") -> dict:
    """`pdl_args` for a kernel that waits for its predecessor late (`launch_early`): PDL 3 on a `_hopper` device;
    `pdl_args` where S2CONV_PDL=1 or the switch (an environment variable) is 0. (Letting the next kernel launch only
    after the wait, rather than first thing, gained less: bench/RESULTS.md, twenty-third session.)"""
    if pdl_enabled(device) or os.environ.get(switch, "1") == "0" or not _hopper(device):
        return pdl_args(device)
    return {"PDL": 3}


def launch_early(kernel, grid, *args, outputs: tuple = (), **kwargs) -> None:
    """`launch` for a kernel with PDL 3 (`early_pdl`): captured into a CUDA graph right after a kernel node,
    it goes out with PDL (launch_pdl), so it starts while its predecessor runs and requests the data that no kernel
    since the last plain launch writes (cached keys and values of earlier positions, the position itself), then waits
    (`common.pdl_wait`) before it reads the predecessor's output. Elsewhere (eager steps, after a copy node, whose
    writes griddepcontrol.wait would not wait for) it goes out plainly. A dry run notes both forms (launch_pdl is a
    compile option): both compile ahead."""
    if kwargs.get("PDL") == 3:
        if _recorded is not None:
            _recorded.append((kernel, grid, args, {**kwargs, "launch_pdl": True}))
        else:
            from s2conv.runtime.kernels.cuda_common import after_kernel
            kwargs["launch_pdl"] = after_kernel(torch.cuda.current_stream().cuda_stream)
    launch(kernel, grid, *args, outputs=outputs, **kwargs)


# ---- compiling ahead: record a dry run's launches, compile their kernels concurrently -------------------------------
# A Triton kernel compiles on its first launch with new specializations, one after another on the host thread: a
# model's first prefill and frame wait for some 20-30 kernels (10-25 s with an empty cache). `recording()` notes the
# launches of a dry run instead of running them, and `compile_launches` compiles every noted kernel at once on a
# thread pool (triton's AsyncCompileMode: on an H100 host 4 threads compiled 3x as fast as 1, 16 no faster than 4;
# bench/RESULTS.md, ninth session).
_recorded: list | None = None


def launch(kernel, grid, *args, outputs: tuple = (), **kwargs) -> None:
    """kernel[grid](*args, **kwargs); inside `recording()` the launch is noted instead and `outputs` (the tensors the
    kernel writes) are zeroed, so that whatever reads them next (indices, softmax) sees valid values."""
    if _recorded is None:
        kernel[grid](*args, **kwargs)
        return
    _recorded.append((kernel, grid, args, kwargs))
    for t in outputs:
        t.zero_()


def recording_active() -> bool:
    """Whether launches are being noted (`recording`) rather than run."""
    return _recorded is not None


@contextlib.contextmanager
def recording():
    """Within the block, kernels go through `launch` unlaunched; yields the list of noted launches (kernel, grid,
    args, kwargs). Not for use during CUDA-graph capture (nothing would be captured)."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


def compile_launches(launches: list, threads: int | None = None) -> int:
    """Compile the kernels of `launches` (from `recording`) on `threads` worker threads (default: the CPU count) and
    wait for them; returns how many distinct launches were submitted (`distinct_launches`). Kernels already in
    triton's caches cost a lookup. Under triton's interpreter there is nothing to compile (returns 0); without
    AsyncCompileMode (older triton) the kernels compile one after another."""
    if _INTERPRETED or not launches:
        return 0
    launches = distinct_launches(launches)
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        AsyncCompileMode = None
    if AsyncCompileMode is None:
        for kernel, grid, args, kwargs in launches:
            kernel.warmup(*args, grid=grid, **kwargs)
        return len(launches)
    from triton.runtime import _async_compile

    with ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="s2conv-compile") as pool:
        mode = AsyncCompileMode(pool)
        try:
            with mode:
                for kernel, grid, args, kwargs in launches:
                    kernel.warmup(*args, grid=grid, **kwargs)
        finally:  # triton 3.6 leaves the mode active when a compile raised: every later load would then refuse
            if _async_compile.active_mode.get() is mode:
                _async_compile.active_mode.set(None)
    return len(launches)


def _spec(value) -> object:
    """What triton's specialization sees of a launch argument: a tensor's dtype and 16-byte alignment, an integer's
    width, divisibility by 16 and being 1; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, int) and not isinstance(value, bool):
        return int, -2**31 <= value < 2**31, value % 16 == 0, value == 1
    if isinstance(value, float):
        return float
    return value


def distinct_launches(launches: list) -> list:
    """One launch of each kernel specialization among `launches` (a model's 36 blocks launch the same ones): keyed by
    the kernel, `_spec` of each positional argument (the runtime ones) and the keyword arguments' values (the
    compile-time ones; a tensor among them by `_spec`). Two launches merged wrongly only leave one kernel to compile
    at its first real launch."""
    seen, out = set(), []
    for launch_ in launches:
        kernel, _, args, kwargs = launch_
        key = (id(kernel), tuple(map(_spec, args)),
               tuple(sorted((k, _spec(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(launch_)
    return out
