"""ggml types s2conv can read but not write: the i-quants (IQ1_S ... IQ4_XS), TQ1_0, MXFP4 and NVFP4.

They exist so that `unpack`/`verify` can decode any GGUF whose types gguf-py decodes. Each decoder is pure torch
(runs on CUDA too) and repeats gguf-py's float32 arithmetic step by step, so results are bit-identical to
`gguf.quants.dequantize`. The i-quant codebooks (grids, sign table) are taken from gguf-py, which ships them.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from s2conv.quant_formats.ggml_common import (GGMLFormat, f16_from_bytes, u16_from_bytes, u32_from_bytes,
                                              unpack_bits, unpack_nibbles)

QK_K = 256
_IQ_DELTA = 0.125  # IQ1_S / IQ1_M grid offset
# Values of the 4-bit codes: IQ4_NL/IQ4_XS's non-linear levels and the doubled e2m1 levels of MXFP4/NVFP4.
_KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_KVALUES_E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@functools.lru_cache(maxsize=None)
def _table(name: str, device: torch.device) -> torch.Tensor:
    """Constant lookup tables, built once per device. Grids are (entries, values-per-entry) float32."""
    if name == "ksigns":  # 7-bit sign index -> 8 sign bits (even parity)
        t = torch.from_numpy(np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).copy())
    elif name == "iq4nl":
        t = torch.tensor(_KVALUES_IQ4NL, dtype=torch.float32)
    elif name == "e2m1":
        t = torch.tensor(_KVALUES_E2M1, dtype=torch.float32)
    elif name == "e8m0_half":  # ggml_e8m0_to_fp32_half: 2**(e - 128), subnormal for e < 2
        e = np.arange(256, dtype=np.uint32)
        bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23)).astype(np.uint32)
        t = torch.from_numpy(bits.view(np.float32).copy())
    elif name == "ue4m3_half":  # unsigned e4m3 (bias 7) times 0.5; 0 and 0x7F decode to 0
        x = np.arange(256)
        exp, man = (x >> 3) & 0xF, x & 7
        val = np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * 2.0 ** (exp - 7)) * 0.5  # exact in float32
        val[(x == 0) | (x == 0x7F)] = 0.0
        t = torch.from_numpy(val.astype(np.float32))
    else:  # an i-quant grid, e.g. "IQ2_XXS"
        cls = getattr(quants, name)
        cls.init_grid()
        t = torch.from_numpy(np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32))
    return t.to(device)


def _signs(bits: torch.Tensor) -> torch.Tensor:
    """uint8 sign bytes (...,) -> (..., 8) float32 +-1, bit j of a byte giving element j (1 = negative)."""
    flat = bits.reshape(-1, 1)
    s = unpack_bits(flat).reshape(*bits.shape, 8)
    return 1.0 - 2.0 * s.to(torch.float32)


class _DequantOnly(GGMLFormat):
    can_quantize = False


class TQ1_0(_DequantOnly, name="tq1_0"):
    """Ternary, base-3 packed: qs[48] | qh[4] | d (f16); 5 (qs) or 4 (qh) trits per byte, 1.69 bits/weight."""

    ggml_type = GGMLQuantizationType.TQ1_0

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, 52:54])
        pow3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8, device=blocks.device).reshape(1, 5, 1)
        # Multiplying by 3**n in uint8 (wrapping) moves trit n to the top; (byte * 3) >> 8 reads it out.
        parts = [(blocks[:, :32].reshape(nb, 1, 32) * pow3).reshape(nb, 160),
                 (blocks[:, 32:48].reshape(nb, 1, 16) * pow3).reshape(nb, 80),
                 (blocks[:, 48:52].reshape(nb, 1, 4) * pow3[:, :4]).reshape(nb, 16)]
        trits = ((torch.cat(parts, dim=1).to(torch.int16) * 3) >> 8) - 1
        return d * trits.to(torch.float32)


class MXFP4(_DequantOnly, name="mxfp4"):
    """OCP microscaling FP4: e (e8m0 exponent) | qs[16] e2m1 codes (low nibbles first), 4.25 bits/weight."""

    ggml_type = GGMLQuantizationType.MXFP4

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = _table("e8m0_half", blocks.device)[blocks[:, :1].long()]
        return d * _table("e2m1", blocks.device)[unpack_nibbles(blocks[:, 1:]).long()]


class NVFP4(_DequantOnly, name="nvfp4"):
    """NVIDIA FP4: 4 ue4m3 scales (one per 16 weights) | qs[32] e2m1 codes, 4.5 bits/weight."""

    ggml_type = GGMLQuantizationType.NVFP4

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = _table("ue4m3_half", blocks.device)[blocks[:, :4].long()].reshape(nb, 4, 1)
        codes = unpack_nibbles(blocks[:, 4:].reshape(nb * 4, 8)).reshape(nb, 4, 16)
        return (d * _table("e2m1", blocks.device)[codes.long()]).reshape(nb, 64)


class IQ4_NL(_DequantOnly, name="iq4_nl"):
    """d (f16) | qs[16]: 4-bit indices into 16 non-linear levels, 4.5 bits/weight."""

    ggml_type = GGMLQuantizationType.IQ4_NL

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = f16_from_bytes(blocks[:, :2])
        return d * _table("iq4nl", blocks.device)[unpack_nibbles(blocks[:, 2:]).long()]


class IQ4_XS(_DequantOnly, name="iq4_xs"):
    """d (f16) | scales_h (u16: 2 bits per sub-block) | scales_l[4] (nibbles) | qs[128]; 8 sub-blocks of 32."""

    ggml_type = GGMLQuantizationType.IQ4_XS

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        scales_h = u16_from_bytes(blocks[:, 2:4])  # (nb, 1)
        shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=blocks.device)
        high = (scales_h >> shifts) & 3  # (nb, 8)
        low = torch.stack([blocks[:, 4:8] & 0x0F, blocks[:, 4:8] >> 4], dim=-1).reshape(nb, 8)
        scales = (low.to(torch.int32) | (high << 4)) - 32
        dl = (d * scales.to(torch.float32)).reshape(nb, 8, 1)
        codes = unpack_nibbles(blocks[:, 8:].reshape(nb * 8, 16)).reshape(nb, 8, 32)
        return (dl * _table("iq4nl", blocks.device)[codes.long()]).reshape(nb, QK_K)


class IQ2_XXS(_DequantOnly, name="iq2_xxs"):
    """d (f16) | 8 groups of (4 grid bytes, u32 of 4x7 sign indices + 4-bit scale); 2.06 bits/weight."""

    ggml_type = GGMLQuantizationType.IQ2_XXS

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        groups = blocks[:, 2:].reshape(nb, 8, 8)
        aux = u32_from_bytes(groups[:, :, 4:]).reshape(nb, 8)
        db = (d * (0.5 + (aux >> 28).to(torch.float32)) * 0.25).reshape(nb, 8, 1, 1)
        shifts = torch.tensor([0, 7, 14, 21], device=blocks.device)
        sign_idx = (aux.unsqueeze(-1) >> shifts) & 127  # (nb, 8, 4)
        signs = _signs(_table("ksigns", blocks.device)[sign_idx])  # (nb, 8, 4, 8)
        grid = _table("IQ2_XXS", blocks.device)[groups[:, :, :4].long()]  # (nb, 8, 4, 8)
        return (db * grid * signs).reshape(nb, QK_K)


class IQ2_XS(_DequantOnly, name="iq2_xs"):
    """d (f16) | qs: 32 u16 (9-bit grid index, 7-bit sign index) | scales[8] (nibbles); 2.31 bits/weight."""

    ggml_type = GGMLQuantizationType.IQ2_XS

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        qs = u16_from_bytes(blocks[:, 2:66])  # (nb, 32)
        scales = unpack_nibble_pairs(blocks[:, 66:74])  # (nb, 16)
        db = (d * (0.5 + scales.to(torch.float32)) * 0.25).reshape(nb, 16, 1, 1)
        signs = _signs(_table("ksigns", blocks.device)[(qs >> 9).long()]).reshape(nb, 16, 2, 8)
        grid = _table("IQ2_XS", blocks.device)[(qs & 511).long()].reshape(nb, 16, 2, 8)
        return (db * grid * signs).reshape(nb, QK_K)


class IQ2_S(_DequantOnly, name="iq2_s"):
    """d (f16) | qs[32] (grid low bits) | signs[32] | qh[8] (2 grid high bits each) | scales[8]; 2.56 bits/w."""

    ggml_type = GGMLQuantizationType.IQ2_S

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        scales = unpack_nibble_pairs(blocks[:, 74:82])
        db = (d * (0.5 + scales.to(torch.float32)) * 0.25).reshape(nb, 16, 1, 1)
        signs = _signs(blocks[:, 34:66]).reshape(nb, 16, 2, 8)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device)
        high = ((blocks[:, 66:74].unsqueeze(-1) >> shifts) & 3).reshape(nb, 32)
        idx = blocks[:, 2:34].long() | (high.long() << 8)
        grid = _table("IQ2_S", blocks.device)[idx].reshape(nb, 16, 2, 8)
        return (db * grid * signs).reshape(nb, QK_K)


class IQ3_XXS(_DequantOnly, name="iq3_xxs"):
    """d (f16) | qs[64] (grid indices, 4 values each) | 8 u32 (4x7 sign indices + 4-bit scale); 3.06 bits/w."""

    ggml_type = GGMLQuantizationType.IQ3_XXS

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        aux = u32_from_bytes(blocks[:, 66:98])  # (nb, 8)
        db = (d * (0.5 + (aux >> 28).to(torch.float32)) * 0.5).reshape(nb, 8, 1, 1)
        shifts = torch.tensor([0, 7, 14, 21], device=blocks.device)
        signs = _signs(_table("ksigns", blocks.device)[(aux.unsqueeze(-1) >> shifts) & 127])  # (nb, 8, 4, 8)
        grid = _table("IQ3_XXS", blocks.device)[blocks[:, 2:66].long()].reshape(nb, 8, 4, 8)
        return (db * grid * signs).reshape(nb, QK_K)


class IQ3_S(_DequantOnly, name="iq3_s"):
    """d (f16) | qs[64] | qh[8] (grid index bit 8) | signs[32] | scales[4] (nibbles); 3.44 bits/weight."""

    ggml_type = GGMLQuantizationType.IQ3_S

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        scales = unpack_nibble_pairs(blocks[:, 106:110])  # (nb, 8)
        db = (d * (1 + 2 * scales.to(torch.float32))).reshape(nb, 8, 1, 1)
        signs = _signs(blocks[:, 74:106]).reshape(nb, 8, 4, 8)
        idx = blocks[:, 2:66].long() | (unpack_bits(blocks[:, 66:74]).long() << 8)
        grid = _table("IQ3_S", blocks.device)[idx].reshape(nb, 8, 4, 8)
        return (db * grid * signs).reshape(nb, QK_K)


class IQ1_S(_DequantOnly, name="iq1_s"):
    """d (f16) | qs[32] (grid low bits) | 8 u16 (4x3 grid high bits, 3-bit scale, delta sign); 1.56 bits/w."""

    ggml_type = GGMLQuantizationType.IQ1_S

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        d = f16_from_bytes(blocks[:, :2])
        qh = u16_from_bytes(blocks[:, 34:50])  # (nb, 8)
        dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(nb, 8, 1, 1)
        delta = torch.where((qh & 0x8000) == 0, _IQ_DELTA, -_IQ_DELTA).reshape(nb, 8, 1, 1)
        shifts = torch.tensor([0, 3, 6, 9], dtype=torch.int32, device=blocks.device)
        idx = blocks[:, 2:34].long() | (((qh.unsqueeze(-1) >> shifts) & 7).reshape(nb, 32).long() << 8)
        grid = _table("IQ1_S", blocks.device)[idx].reshape(nb, 8, 4, 8)
        return (dl * (grid + delta)).reshape(nb, QK_K)


class IQ1_M(_DequantOnly, name="iq1_m"):
    """qs[32] | qh[16] (3 grid high bits + delta sign per nibble) | 4 u16 scales (3-bit sub-scales, and the
    f16 super-scale spread over their top nibbles); 1.75 bits/weight."""

    ggml_type = GGMLQuantizationType.IQ1_M

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        sc = u16_from_bytes(blocks[:, 48:56])  # (nb, 4)
        d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 12) << 4) | ((sc[:, 2] >> 12) << 8) | ((sc[:, 3] >> 12) << 12)
        d = d_bits.to(torch.int16).view(torch.float16).to(torch.float32).reshape(nb, 1)
        shifts = torch.tensor([0, 3, 6, 9], dtype=torch.int32, device=blocks.device)
        sub = ((sc.unsqueeze(-1) >> shifts) & 7).reshape(nb, 16)
        dl = (d * (2 * sub + 1).to(torch.float32)).reshape(nb, 8, 2, 1, 1)
        qh = unpack_nibble_pairs(blocks[:, 32:48])  # (nb, 32): one nibble per grid index
        idx = blocks[:, :32].long() | ((qh & 7).long() << 8)
        delta = torch.where((qh & 8) == 0, _IQ_DELTA, -_IQ_DELTA).reshape(nb, 8, 2, 2, 1)
        grid = _table("IQ1_S", blocks.device)[idx].reshape(nb, 8, 2, 2, 8)
        return (dl * (grid + delta)).reshape(nb, QK_K)


def unpack_nibble_pairs(b: torch.Tensor) -> torch.Tensor:
    """(nb, k) uint8 -> (nb, 2k): low then high nibble of each byte in turn (byte i -> elements 2i, 2i+1)."""
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)
