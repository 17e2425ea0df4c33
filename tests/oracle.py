"""llama.cpp as a test oracle: ctypes bindings to the libggml-base.so bundled with llama-cpp-python.

Gives the reference quantizers (`ggml_quantize_chunk`), the C dequantizers (`dequantize_row_*`) and the C GGUF
loader (`gguf_init_from_file`). `load_ggml()` returns None when llama-cpp-python is not installed
(`bash scripts/install_oracle.sh` installs it); the `ggml` fixture then skips, or fails under S2CONV_REQUIRE_ORACLE=1.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _GGUFInitParams(ctypes.Structure):
    # struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; }
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@dataclass
class GGUFTensorInfo:
    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous dimension, trailing 1s dropped
    offset: int  # relative to the start of the data section
    size: int  # bytes, without padding


@dataclass
class GGUFInfo:
    """What the C loader reports about a file it accepted."""

    version: int
    alignment: int
    data_offset: int  # absolute file offset of the data section
    keys: list[str]
    tensors: list[GGUFTensorInfo] = field(default_factory=list)
    log: str = ""  # anything ggml logged while loading (warnings)


class Ggml:
    """Thin ctypes wrapper over libggml-base.so. Every method is single-threaded (as the C functions are)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        lib = ctypes.CDLL(self.path)
        self.lib = lib
        i64, sz, vp, cp = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
        sig = {
            "ggml_quantize_chunk": (sz, [ctypes.c_int, vp, vp, i64, i64, i64, vp]),
            "ggml_row_size": (sz, [ctypes.c_int, i64]),
            "ggml_blck_size": (i64, [ctypes.c_int]),
            "ggml_type_size": (sz, [ctypes.c_int]),
            "ggml_type_name": (cp, [ctypes.c_int]),
            "ggml_log_set": (None, [_LOG_CALLBACK, vp]),
            "ggml_free": (None, [vp]),
            "gguf_init_from_file": (vp, [cp, _GGUFInitParams]),
            "gguf_free": (None, [vp]),
            "gguf_get_version": (ctypes.c_uint32, [vp]),
            "gguf_get_alignment": (sz, [vp]),
            "gguf_get_data_offset": (sz, [vp]),
            "gguf_get_n_kv": (i64, [vp]),
            "gguf_get_key": (cp, [vp, i64]),
            "gguf_find_key": (i64, [vp, cp]),
            "gguf_get_n_tensors": (i64, [vp]),
            "gguf_get_tensor_name": (cp, [vp, i64]),
            "gguf_get_tensor_type": (ctypes.c_int, [vp, i64]),
            "gguf_get_tensor_offset": (sz, [vp, i64]),
            "gguf_get_tensor_size": (sz, [vp, i64]),
            "gguf_get_tensor_ne": (ctypes.POINTER(i64), [vp, i64]),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes

    # ----- quantization ---------------------------------------------------------------------------------------
    def row_size(self, qtype: GGMLQuantizationType, n_cols: int) -> int:
        return int(self.lib.ggml_row_size(int(qtype), n_cols))

    def quantize(self, qtype: GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
        """llama.cpp's reference quantizer (imatrix NULL): (rows, cols) float32 -> (rows, row_size) uint8."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        out = np.zeros((rows, self.row_size(qtype, cols)), dtype=np.uint8)
        n = self.lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        if n != out.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.nbytes}")
        return out

    def dequantize(self, qtype: GGMLQuantizationType, data: np.ndarray, n_cols: int) -> np.ndarray:
        """The C dequantizer `dequantize_row_<type>`: (rows, row_size) uint8 -> (rows, n_cols) float32."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        rows = data.shape[0]
        if data.shape[1] != self.row_size(qtype, n_cols):
            raise ValueError(f"row of {data.shape[1]} bytes, expected {self.row_size(qtype, n_cols)}")
        out = np.empty((rows, n_cols), dtype=np.float32)
        fn = self._dequant_fn(int(qtype))
        fn(data.ctypes.data, out.ctypes.data, rows * n_cols)
        return out

    @functools.lru_cache(maxsize=None)
    def _dequant_fn(self, qtype: int):
        special = {int(GGMLQuantizationType.F16): "ggml_fp16_to_fp32_row",
                   int(GGMLQuantizationType.BF16): "ggml_bf16_to_fp32_row"}
        name = special.get(qtype) or "dequantize_row_" + self.lib.ggml_type_name(qtype).decode()
        fn = getattr(self.lib, name)
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        return fn

    # ----- the GGUF loader ------------------------------------------------------------------------------------
    def gguf_open(self, path: str | os.PathLike, read_data: bool = False) -> tuple[bool, GGUFInfo | str]:
        """Open a file with llama.cpp's `gguf_init_from_file`.

        Returns (True, GGUFInfo) when the loader accepts it, else (False, the error text ggml logged).
        read_data=True also reads the whole data section into memory (no_alloc=false), which makes the loader
        fail on a truncated file; without it only the header is checked.
        """
        messages: list[str] = []

        def on_log(level, text, user_data):  # noqa: ARG001 (ctypes callback signature)
            messages.append(text.decode(errors="replace") if text else "")

        callback = _LOG_CALLBACK(on_log)  # keep a reference while C may call it
        ggml_ctx = ctypes.c_void_p()
        params = _GGUFInitParams(no_alloc=not read_data, ctx=ctypes.pointer(ggml_ctx) if read_data else None)
        self.lib.ggml_log_set(callback, None)
        try:
            ctx = self.lib.gguf_init_from_file(os.fsencode(path), params)
        finally:
            self.lib.ggml_log_set(_LOG_CALLBACK(), None)  # NULL restores ggml's default logger
        log = "".join(messages)
        if not ctx:
            return False, log.strip() or "gguf_init_from_file returned NULL (no message)"
        try:
            info = GGUFInfo(
                version=int(self.lib.gguf_get_version(ctx)),
                alignment=int(self.lib.gguf_get_alignment(ctx)),
                data_offset=int(self.lib.gguf_get_data_offset(ctx)),
                keys=[self.lib.gguf_get_key(ctx, i).decode() for i in range(self.lib.gguf_get_n_kv(ctx))],
                log=log,
            )
            for i in range(self.lib.gguf_get_n_tensors(ctx)):
                ne_ptr = self.lib.gguf_get_tensor_ne(ctx, i)
                ne = [int(ne_ptr[d]) for d in range(4)]
                while len(ne) > 1 and ne[-1] == 1:
                    ne.pop()
                info.tensors.append(GGUFTensorInfo(
                    name=self.lib.gguf_get_tensor_name(ctx, i).decode(),
                    type=GGMLQuantizationType(self.lib.gguf_get_tensor_type(ctx, i)),
                    ne=tuple(ne),
                    offset=int(self.lib.gguf_get_tensor_offset(ctx, i)),
                    size=int(self.lib.gguf_get_tensor_size(ctx, i)),
                ))
        finally:
            self.lib.gguf_free(ctx)
            if ggml_ctx.value:
                self.lib.ggml_free(ggml_ctx)
        return True, info


def find_library() -> Path | None:
    """Path of llama-cpp-python's libggml-base.so, or None when llama_cpp is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            candidate = Path(root) / "lib" / name
            if candidate.exists():
                return candidate
    return None


@functools.lru_cache(maxsize=1)
def load_ggml() -> Ggml | None:
    """The oracle, or None when the library is not installed (importing llama_cpp itself is not needed)."""
    path = find_library()
    return Ggml(path) if path is not None else None


@pytest.fixture(scope="session")
def ggml() -> Ggml:
    """The oracle; skips the test when it is missing, fails instead when S2CONV_REQUIRE_ORACLE=1."""
    lib = load_ggml()
    if lib is None:
        message = "llama.cpp oracle missing: run `bash scripts/install_oracle.sh` (installs llama-cpp-python 0.3.36)"
        if os.environ.get("S2CONV_REQUIRE_ORACLE") == "1":
            pytest.fail(message + " [S2CONV_REQUIRE_ORACLE=1]")
        pytest.skip(message)
    return lib
