"""Shared machinery of s2conv's own symmetric formats (fp8, q8, q4, q3, q2): scale search, bit packing, chunking.

Every S2 format stores a row as independent blocks `[fp32 scale (little-endian) | packed codes]`, one block per
group of `group_size` input columns (per-row formats: one block per row). A weight decodes as `code * scale`.
docs/formats.md gives the byte layouts; this module holds what the five formats share.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ClassVar

import numpy as np
import torch

from s2conv.errors import QuantFormatError
from s2conv.quant_formats.base import QuantFormat

LAYOUT_VERSION = 1  # version of the byte layouts in docs/formats.md (GGUF key s2conv.layout_version)
METHODS = ("rtn", "search")
SCALE_BYTES = 4  # every block starts with its float32 scale
FP16_MAX = 65504.0
CHUNK_ELEMS = 1 << 19  # weights per work item: fewer, larger torch calls measured ~1.5x faster than 2**17 here

# ----- bit-field packing --------------------------------------------------------------------------------------
# A group of g codes is packed into planes of `bits`-bit fields: with n = 8 // bits fields per byte, byte j of the
# plane holds elements j, j + g/n, j + 2g/n, ... at bit offsets 0, bits, 2*bits, ... A GPU kernel unpacks a whole
# plane with one load and n shifts, no gathers (this is Q4_0's "split halves" generalised).
# On the CPU the shifts run on 64-bit words, 8 fields at once: a field < 2**bits shifted by less than 8 - bits
# stays inside its own byte, so bytes never mix (whatever the byte order).

_LANE_MASK = {b: int.from_bytes(bytes([(1 << b) - 1] * 8), "little") for b in (1, 2, 4)}


def _lanes(x, m: int):
    """View the last dim of a uint8 array as 64-bit words when m (its length) allows, else leave it bytes."""
    if m % 8:
        return x
    if isinstance(x, torch.Tensor):
        if x.storage_offset() % 8 or any(st % 8 for st in x.stride()[:-1]):  # words must start on 8-byte steps
            x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
        return x.view(torch.int64)
    return x.view(np.uint64)


def pack_fields(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(G, g) uint8 values < 2**bits -> (G, g * bits // 8) uint8 packed plane (layout above)."""
    n = 8 // bits
    parts = _lanes(u.contiguous().reshape(u.shape[0], n, -1), u.shape[1] // n)  # (G, n, words)
    shifts = (torch.arange(n) * bits).to(parts.dtype).reshape(1, n, 1)
    # the shifted fields occupy disjoint bits, so their sum is their bitwise OR (two ops instead of 2n)
    return (parts << shifts).sum(dim=1, dtype=parts.dtype).view(torch.uint8)


def unpack_fields_np(plane: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_fields` in numpy: (G, nbytes) uint8 -> (G, nbytes * 8 // bits) uint8."""
    n = 8 // bits
    words = _lanes(np.ascontiguousarray(plane), plane.shape[1])
    shifts = (np.arange(n) * bits).astype(words.dtype).reshape(1, n, 1)
    mask = _LANE_MASK[bits] if words.dtype == np.uint64 else (1 << bits) - 1
    fields = (words[:, None, :] >> shifts) & words.dtype.type(mask)
    return fields.view(np.uint8).reshape(plane.shape[0], -1)


def unpack_fields_torch(plane: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_fields` in torch (any device): (G, nbytes) uint8 -> (G, nbytes * 8 // bits) uint8."""
    n = 8 // bits
    words = _lanes(plane.contiguous(), plane.shape[1])
    shifts = (torch.arange(n, device=plane.device) * bits).to(words.dtype).reshape(1, n, 1)
    # int64 >> is arithmetic: sign bits enter the top byte's high bits only, which the mask drops
    mask = _LANE_MASK[bits] if words.dtype == torch.int64 else (1 << bits) - 1
    fields = (words[:, None, :] >> shifts) & mask
    return fields.view(torch.uint8).reshape(plane.shape[0], -1)


# ----- scratch buffers ----------------------------------------------------------------------------------------
# torch's CPU allocator hands large buffers back to the OS on free, and touching fresh pages again costs more than
# the arithmetic on them; so each worker thread reuses its own chunk-sized float32 buffers.
_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 CPU buffer of `shape` owned by the calling thread, reused across calls (contents undefined)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    n = 1
    for d in shape:
        n *= d
    if buf is None or buf.numel() != n:
        buf = bufs[name] = torch.empty(n, dtype=torch.float32)
    return buf.view(shape)


# ----- scale search -------------------------------------------------------------------------------------------


def _real_scales(a: torch.Tensor, c: torch.Tensor | float, fp16: bool) -> torch.Tensor:
    """Group scales in weight units for code multipliers c (code = round(w / absmax * c)): absmax / c, rounded to a
    float16 value when asked. A scale of 0 means the group decodes to zeros."""
    s = a / c
    if fp16:
        s = s.to(torch.float16).to(torch.float32)
    return s


def _multiplier(a_safe: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """c = absmax / scale, taking normalised weights x = w / absmax to code units (0 where the scale is 0)."""
    return torch.where(s > 0, a_safe / torch.where(s > 0, s, 1.0), 0.0)


def _column(c: torch.Tensor | float) -> torch.Tensor | float:
    """A per-group (G,) multiplier as a (G, 1) column for broadcasting; a float stays a float."""
    return c[:, None] if isinstance(c, torch.Tensor) else c


def _scale_of(a: torch.Tensor, c: torch.Tensor | float, fp16: bool) -> torch.Tensor:
    """The stored scale absmax / c of the chosen multipliers (0 where c is 0). With fp16, c came from an
    fp16-rounded scale s and absmax / c gives s back to within float32 rounding, which fp16 rounding removes."""
    if isinstance(c, torch.Tensor):
        c = torch.where(c > 0, c, torch.inf)
    return _real_scales(a, c, fp16)


def _group_error(x: torch.Tensor, c: torch.Tensor | float, qmax: float, sxx: torch.Tensor,
                 t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Squared error sum((x - q / c)^2) per group (normalised units) of the codes q = clamp(round(x * c)).

    c is a float (the same multiplier for every group) or a (G,) tensor. t and q are (G, g) scratch buffers:
    writing into them instead of allocating keeps the hot loop free of allocator work and in cache.
    """
    torch.mul(x, _column(c), out=t)
    torch.round(t, out=q).clamp_(-qmax, qmax)
    e = torch.linalg.vector_norm(t.sub_(q), dim=1).square_()  # residual in code units; in x units it is / c
    if not isinstance(c, torch.Tensor):
        return e / (c * c)
    return torch.where(c > 0, e / torch.where(c > 0, c, 1.0).square(), sxx)


def search_scales(w: torch.Tensor, qmax: int, ratios: tuple[float, ...], refit: bool, fp16: bool):
    """Choose one scale per group of a symmetric integer grid [-qmax, qmax] and round the weights onto it.

    w: (G, g) float32, finite. Candidates are scale = ratio * absmax / qmax for each clipping ratio (ratios[0]
    must be 1.0: plain round-to-nearest, so the result is never worse than it), then, if `refit`, the
    least-squares scale for the best candidate's codes, sum(w q) / sum(q q), with codes re-rounded to it. The
    candidate with the smallest squared error wins per group. With fp16=True every candidate scale is rounded to a
    float16 value before its codes are chosen. Returns (scale (G,) float32 >= 0, codes (G, g) float32 integers);
    codes is a scratch buffer, valid until this thread's next call.
    """
    t, q, x = scratch("t", w.shape), scratch("q", w.shape), scratch("x", w.shape)
    a = torch.abs(w, out=t).amax(dim=1)
    a_safe = torch.where(a > 0, a, 1.0)
    torch.div(w, a_safe[:, None], out=x)  # normalised to [-1, 1]: squares cannot overflow even for |w| near float32 max
    sxx = torch.linalg.vector_norm(x, dim=1).square_()

    def multiplier(c: float | torch.Tensor) -> torch.Tensor | float:
        """The multiplier actually used for a nominal one: with fp16, the one of the fp16-rounded scale."""
        return _multiplier(a_safe, _real_scales(a, c, fp16)) if fp16 else c

    mults = [multiplier(qmax / r) for r in ratios]
    if len(mults) == 1 and not refit:  # plain rtn: nothing to compare
        best_c = mults[0]
    else:
        # 1. the grid of clipping ratios; min() keeps the first (rtn) candidate on ties
        errs = torch.stack([_group_error(x, c, qmax, sxx, t, q) for c in mults])  # (K, G)
        best_e, k = errs.min(dim=0)
        if fp16:
            best_c = torch.stack(mults).gather(0, k[None])[0]
        else:
            best_c = torch.tensor(mults, dtype=torch.float32)[k]
        # 2. least-squares refit of the scale for the best codes: s = sum(x q) / sum(q q), codes re-rounded to it
        if refit:
            torch.round(torch.mul(x, best_c[:, None], out=t), out=q).clamp_(-qmax, qmax)
            sqq = torch.linalg.vector_norm(q, dim=1).square_()
            sxq = torch.linalg.vecdot(x, q, dim=1)
            ok = (sqq > 0) & (sxq > 0)
            c = multiplier(torch.where(ok, sqq / torch.where(ok, sxq, 1.0), best_c))
            best_c = torch.where(_group_error(x, c, qmax, sxx, t, q) < best_e, c, best_c)
    codes = torch.round(torch.mul(x, _column(best_c), out=t), out=q).clamp_(-qmax, qmax)
    return _scale_of(a, best_c, fp16), codes


# ----- input handling and chunked execution -------------------------------------------------------------------


def as_matrix(w: np.ndarray | torch.Tensor, fmt: str, tensor: str) -> torch.Tensor:
    """A 2-D float CPU tensor view of `w` (numpy arrays are wrapped without copying)."""
    if isinstance(w, np.ndarray):
        if not np.issubdtype(w.dtype, np.floating):
            raise QuantFormatError(f"{tensor}: expected a float array for format {fmt!r}, got dtype {w.dtype}")
        w = torch.from_numpy(np.ascontiguousarray(w))
    elif not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise QuantFormatError(f"{tensor}: expected a float numpy array or torch tensor for format {fmt!r}, "
                               f"got {type(w).__name__} {getattr(w, 'dtype', '')}")
    if w.ndim != 2:
        raise QuantFormatError(f"{tensor}: format {fmt!r} needs a 2-D (rows, cols) tensor, got shape "
                               f"{tuple(w.shape)}")
    return w.detach().cpu()


def require_finite(chunk: torch.Tensor, row0: int, fmt: str, tensor: str) -> None:
    """Raise QuantFormatError naming the tensor and the first NaN/Inf position of a (rows, cols) float32 chunk."""
    bad = ~torch.isfinite(chunk)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise QuantFormatError(f"{tensor}: weight is {float(chunk[r, c])} at row {row0 + r}, column {c}; "
                               f"format {fmt!r} needs finite values")


def run_row_chunks(n_rows: int, rows_per_chunk: int, job: Callable[[int, int], None]) -> None:
    """Call job(r0, r1) for consecutive row ranges, spread over torch's CPU threads.

    Each worker runs torch single-threaded on chunks that fit in cache: coarse-grained parallelism keeps both
    cores busy with small tensors, and stays fast on a loaded machine where intra-op thread barriers stall.
    torch's thread count is restored afterwards.
    """
    ranges = [(r, min(r + rows_per_chunk, n_rows)) for r in range(0, n_rows, rows_per_chunk)]
    n_threads = min(torch.get_num_threads(), len(ranges))
    if n_threads <= 1:
        for r0, r1 in ranges:
            job(r0, r1)
        return
    prev = torch.get_num_threads()

    def work(r: tuple[int, int]) -> None:
        torch.set_num_threads(1)  # per worker thread: intra-op parallelism would fight the pool
        job(*r)

    try:
        torch.set_num_threads(1)
        with ThreadPoolExecutor(n_threads) as pool:
            for _ in pool.map(work, ranges):  # re-raises the first failing chunk's error, in row order
                pass
    finally:
        torch.set_num_threads(prev)


def _as_bytes_np(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.int8:  # GGUF readers return I8 tensors as int8
        data = data.view(np.uint8)
    return data


class GroupwiseFormat(QuantFormat):
    """Base of the S2 formats: blocks of [float32 scale | codes], one per group (or per row when group_size is None).

    A subclass sets group_size, qmax, clip_ratios (the "search" grid, 1.0 first) and refit, and implements
    `_encode(codes) -> bytes` and `_decode_np` / `_decode_torch(bytes) -> code values`. The class attributes
    block_size / type_size / row_overhead of QuantFormat follow from these.
    """

    group_size: ClassVar[int | None] = None  # None: one scale per row
    qmax: ClassVar[float]
    clip_ratios: ClassVar[tuple[float, ...]] = (1.0,)
    refit: ClassVar[bool] = True

    # ----- geometry of one block ----------------------------------------------------------------------------
    def _group(self, n_cols: int) -> int:
        return self.group_size or n_cols

    def _code_bytes(self, g: int) -> int:
        """Bytes of packed codes for a group of g weights."""
        raise NotImplementedError

    # ----- codes ---------------------------------------------------------------------------------------------
    def _encode(self, codes: torch.Tensor) -> torch.Tensor:
        """(G, g) float32 code values -> (G, code_bytes) uint8."""
        raise NotImplementedError

    def _decode_np(self, packed: np.ndarray, g: int) -> np.ndarray:
        """(G, code_bytes) uint8 -> (G, g) float32 code values."""
        raise NotImplementedError

    def _decode_torch(self, packed: torch.Tensor, g: int) -> torch.Tensor:
        raise NotImplementedError

    def _scales_and_codes(self, w: torch.Tensor, method: str, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, g) float32 -> (scale (G,) float32, code values (G, g) float32)."""
        ratios = self.clip_ratios if method == "search" else (1.0,)
        return search_scales(w, int(self.qmax), ratios, refit=self.refit and method == "search", fp16=fp16)

    # ----- public API ----------------------------------------------------------------------------------------
    def quantize(self, w: np.ndarray | torch.Tensor, *, method: str = "search", tensor: str = "tensor",
                 fp16_scales: bool = False) -> np.ndarray:
        """(rows, cols) float -> (rows, row_bytes(cols)) uint8 blocks [fp32 scale LE | codes], see docs/formats.md.

        method: "search" (default; error-minimising scale per group, never worse than rtn) or "rtn" (absmax).
        fp16_scales: store only float16-representable scales (codes chosen for the rounded scale), so that the
        ggml compat encoding (`compat.to_compat`) decodes to exactly the same weights.
        Raises QuantFormatError for non-finite weights, a bad row length or an unknown method.
        """
        if method not in METHODS:
            raise QuantFormatError(f"{tensor}: unknown quantization method {method!r}; expected one of {METHODS}")
        w = as_matrix(w, self.name, tensor)
        rows, cols = w.shape
        self.check_cols(cols, tensor)
        g = self._group(cols)
        out = np.empty((rows, self.row_bytes(cols)), dtype=np.uint8)

        def job(r0: int, r1: int) -> None:
            chunk = scratch("w", (r1 - r0, cols)).copy_(w[r0:r1])  # float32
            amax = torch.abs(chunk, out=scratch("t", chunk.shape)).amax(dim=1)
            if not bool(torch.isfinite(amax).all()):  # amax propagates NaN
                require_finite(chunk, r0, self.name, tensor)
            if fp16_scales and float(amax.max()) / self.qmax > FP16_MAX:
                raise QuantFormatError(f"{tensor}: absmax {float(amax.max()):g} needs a scale above the float16 "
                                       f"maximum {FP16_MAX:g} in format {self.name!r}; fp16_scales is impossible")
            scale, codes = self._scales_and_codes(chunk.reshape(-1, g), method, fp16_scales)
            blocks = torch.cat([scale.reshape(-1, 1).view(torch.uint8), self._encode(codes)], dim=1)
            out[r0:r1] = blocks.reshape(r1 - r0, -1).numpy()

        run_row_chunks(rows, max(1, CHUNK_ELEMS // cols), job)
        return out

    def _check_data(self, data, n_cols: int) -> None:
        want = self.row_bytes(n_cols)
        if data.ndim != 2 or data.shape[1] != want:
            raise QuantFormatError(f"format {self.name!r} with {n_cols} columns needs (rows, {want}) bytes, got "
                                   f"shape {tuple(data.shape)}")

    def _unpack(self, data: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, row_bytes) uint8 -> (scales (rows, groups) float32, code values (rows, n_cols) float32)."""
        data = _as_bytes_np(np.asarray(data))
        self._check_data(data, n_cols)
        g = self._group(n_cols)
        rows = data.shape[0]
        blocks = data.reshape(-1, SCALE_BYTES + self._code_bytes(g))
        scales = np.ascontiguousarray(blocks[:, :SCALE_BYTES]).view("<f4").astype(np.float32)
        codes = self._decode_np(blocks[:, SCALE_BYTES:], g)
        return scales.reshape(rows, -1), codes.reshape(rows, n_cols)

    def dequantize(self, data: np.ndarray, n_cols: int) -> np.ndarray:
        """(rows, row_bytes) uint8 (or int8) -> (rows, n_cols) float32 weights, code * scale per group."""
        scales, codes = self._unpack(data, n_cols)
        g = self._group(n_cols)
        rows = codes.shape[0]
        return (codes.reshape(-1, g) * scales.reshape(-1, 1)).reshape(rows, n_cols)

    def dequantize_torch(self, data: torch.Tensor, n_cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pure-torch `dequantize` on data's device (CPU or CUDA); bit-identical to it in float32."""
        if data.dtype == torch.int8:
            data = data.view(torch.uint8)
        self._check_data(data, n_cols)
        g = self._group(n_cols)
        rows = data.shape[0]
        blocks = data.reshape(-1, SCALE_BYTES + self._code_bytes(g))
        scales = blocks[:, :SCALE_BYTES].contiguous().view(torch.float32)  # (G, 1); hosts are little-endian
        codes = self._decode_torch(blocks[:, SCALE_BYTES:], g)
        return (codes * scales).reshape(rows, n_cols).to(dtype)


def int_codes_to_unsigned(codes: torch.Tensor, offset: int) -> torch.Tensor:
    """Integer code values (float32) -> stored unsigned field values code + offset (uint8)."""
    return (codes + offset).to(torch.uint8)

