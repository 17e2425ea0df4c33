"""The causal "modded DAC" codec of S2 Pro: waveform <-> 10 codebooks at sample_rate / frame_length frames/s.

decode: codes [B, 10, T] -> clamp -> sum of VQ out-projections -> post-transformer -> 2x ConvNeXt upsample ->
DAC decoder (Snake, transposed convs, residual units) -> tanh -> [B, 1, T * frame_length].
encode: wav -> DAC encoder (+ windowed transformer) -> 2x ConvNeXt downsample -> pre-transformer -> semantic VQ ->
9 residual VQs. Every conv is left-padded (causal), so the output at time t never depends on input after t.
Weights are the release codec names with weight norm folded (`X.conv.weight`, `X.in_proj.weight`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2conv.errors import RuntimeModelError
from s2conv.runtime.layers import FeedForward, RMSNorm, Attention, window_mask
from s2conv.runtime.rope import precompute_freqs_cis
from s2conv.schema import CodecConfig


# ------------------------------------------------------------------------------------------- convolutions


class CausalConv1d(nn.Module):
    """Conv1d left-padded by K - stride (K = (k-1)*dilation + 1) and right-padded to a whole number of strides:
    [B, Cin, L] -> [B, Cout, ceil(L / stride)] (spec 5.2)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation, groups=groups)
        self.stride = stride
        self.span = (kernel - 1) * dilation + 1

    def forward(self, x: Tensor) -> Tensor:
        left = self.span - self.stride
        n_out = math.ceil((x.shape[-1] - self.span + left) / self.stride + 1)
        right = (n_out - 1) * self.stride + self.span - left - x.shape[-1]
        d = self.conv.dilation[0]
        if d == 1 or self.stride != 1:
            return self.conv(F.pad(x, (left, right)))
        # a dilated conv as a 2-D one over the length folded into rows of d: tap j of output t reads t - j d, the same
        # column j rows up. cuDNN's dilated 1-D kernels are slow at the decoder's shapes (the 384-channel dilation-9
        # conv at 256 frames: 4.7 ms on an H200, about 30 TFLOPS); the folded one runs its ordinary conv kernels.
        # `extra` zeros in front make the padded length a multiple of d; their outputs are dropped (a strided view)
        extra = -(left + x.shape[-1] + right) % d
        xp = F.pad(x, (left + extra, right))
        y = F.conv2d(xp.view(xp.shape[0], xp.shape[1], -1, d), self.conv.weight.unsqueeze(-1), self.conv.bias,
                     groups=self.conv.groups)
        return y.view(y.shape[0], y.shape[1], -1)[..., extra:]


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose last kernel - stride samples are dropped: [B, Cin, L] -> [B, Cout, L * stride]."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride=stride)
        self.trim = kernel - stride

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y[..., : y.shape[-1] - self.trim]


class Snake1d(nn.Module):
    """y = x + sin(alpha x)^2 / (alpha + 1e-9), alpha per channel [1, C, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        snake = _snake_kernel() if x.is_cuda else None
        if snake is not None:
            return snake(x, self.alpha)  # one pass instead of five (kernels/codec_ops.py)
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def _snake_kernel():
    """The fused Snake launcher, or None without triton."""
    try:
        from s2conv.runtime.kernels.codec_ops import snake
    except ImportError:
        return None
    return snake


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x)))), lengths preserved."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(channels), CausalConv1d(channels, channels, 7, dilation=dilation),
            Snake1d(channels), CausalConv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class EncoderBlock(nn.Module):
    """3 residual units on dim/2 channels -> Snake -> strided conv to dim channels (-> windowed transformer)."""

    def __init__(self, dim: int, stride: int, transformer: nn.Module | None):
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, 1), ResidualUnit(half, 3), ResidualUnit(half, 9), Snake1d(half),
            CausalConv1d(half, dim, 2 * stride, stride=stride), transformer or nn.Identity())

    def forward(self, x: Tensor) -> Tensor:  # [B, dim/2, L] -> [B, dim, L / stride]
        return self.block(x)


class DecoderBlock(nn.Module):
    """Snake -> transposed conv (x stride) -> 3 residual units."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(c_in), CausalConvTranspose1d(c_in, c_out, 2 * stride, stride),
            ResidualUnit(c_out, 1), ResidualUnit(c_out, 3), ResidualUnit(c_out, 9))

    def forward(self, x: Tensor) -> Tensor:  # [B, c_in, L] -> [B, c_out, L * stride]
        return self.block(x)


class ConvNeXtBlock(nn.Module):
    """x + gamma * pwconv2(gelu(pwconv1(layernorm(causal_depthwise_conv7(x))))), channels-last inside."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, L]
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + (self.gamma * y).transpose(1, 2)


# ------------------------------------------------------------------------------------------- transformer


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class CodecTransformerBlock(nn.Module):
    """h = x + gamma_attn * attn(norm(x)); out = h + gamma_ffn * ffn(norm(h)). No QK-norm, no KV cache."""

    def __init__(self, dim: int, n_head: int, head_dim: int, hidden: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, n_head, n_head, head_dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)
        self.attention_layer_scale = LayerScale(dim)
        self.ffn_layer_scale = LayerScale(dim)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), freqs_cis, mask))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowLimitedTransformer(nn.Module):
    """Causal transformer whose queries see the last `window` steps; channels-first [B, C, T] in and out.

    RoPE positions are 0..T-1 plus `pos_offset` (streaming decode passes the absolute position of its first step)."""

    def __init__(self, dim: int, n_layer: int, n_head: int, head_dim: int, hidden: int, window: int,
                 eps: float, rope_base: float):
        super().__init__()
        self.layers = nn.ModuleList(CodecTransformerBlock(dim, n_head, head_dim, hidden, eps) for _ in range(n_layer))
        self.norm = RMSNorm(dim, eps)
        self.window, self.head_dim, self.rope_base = window, head_dim, rope_base
        self._freqs: Tensor | None = None

    def rope_rows(self, start: int, n: int, device) -> Tensor:
        """Rows start..start+n-1 of the bf16 RoPE table (built once, grown on demand; rows are length-independent)."""
        if self._freqs is None or self._freqs.shape[0] < start + n or self._freqs.device != torch.device(device):
            size = max(start + n, 4096)
            self._freqs = precompute_freqs_cis(size, self.head_dim, self.rope_base).to(device)
        return self._freqs[start: start + n]

    def forward(self, x: Tensor, pos_offset: int = 0, freqs: Tensor | None = None) -> Tensor:
        x = x.transpose(1, 2)  # [B, T, C]
        t = x.shape[1]
        freqs = self.rope_rows(pos_offset, t, x.device) if freqs is None else freqs
        mask = window_mask(t, self.window, x.device)
        for layer in self.layers:
            x = layer(x, freqs, mask)
        return self.norm(x).transpose(1, 2)


# ------------------------------------------------------------------------------------------- quantizer


class VectorQuantize(nn.Module):
    """One codebook: 1x1 in-projection to codebook_dim, cosine nearest neighbour, raw code vector out-projected."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = nn.Conv1d(dim, codebook_dim, 1)
        self.out_proj = nn.Conv1d(codebook_dim, dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def encode(self, z: Tensor) -> Tensor:
        """z [B, dim, T] -> codes [B, T]: argmin ||normalize(in_proj z) - normalize(codebook)||."""
        e = F.normalize(self.in_proj(z).transpose(1, 2).float(), dim=-1)  # [B, T, d]
        book = F.normalize(self.codebook.weight.float(), dim=-1)  # [K, d]
        dist = e.pow(2).sum(-1, keepdim=True) - 2 * e @ book.T + book.pow(2).sum(-1)
        return dist.argmin(dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, T] -> out_proj(codebook[codes]) [B, dim, T]."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class ResidualVectorQuantize(nn.Module):
    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(VectorQuantize(dim, codebook_size, codebook_dim) for _ in range(n_codebooks))

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, dim, T] -> (codes [B, n, T], quantized sum [B, dim, T]); each stage quantizes the remainder."""
        codes, total, residual = [], torch.zeros_like(z), z
        for vq in self.quantizers:
            c = vq.encode(residual)
            zq = vq.decode(c)
            codes.append(c)
            total, residual = total + zq, residual - zq
        return torch.stack(codes, dim=1), total

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, n, T] -> sum of the stages' out-projections [B, dim, T]."""
        return sum(vq.decode(codes[:, i]) for i, vq in enumerate(self.quantizers))


class DownsampleResidualVectorQuantize(nn.Module):
    """Semantic VQ + residual VQs between a ConvNeXt down/up-sampler and pre/post windowed transformers."""

    def __init__(self, cc: CodecConfig, pre_module: nn.Module, post_module: nn.Module):
        super().__init__()
        d = cc.latent_dim
        self.semantic_quantizer = ResidualVectorQuantize(d, 1, cc.semantic_codebook_size, cc.codebook_dim)
        self.quantizer = ResidualVectorQuantize(d, cc.n_residual_codebooks, cc.residual_codebook_size,
                                                cc.codebook_dim)
        self.downsample = nn.Sequential(*(nn.Sequential(CausalConv1d(d, d, f, stride=f), ConvNeXtBlock(d))
                                          for f in cc.downsample_factor))
        self.upsample = nn.Sequential(*(nn.Sequential(CausalConvTranspose1d(d, d, f, f), ConvNeXtBlock(d))
                                        for f in reversed(cc.downsample_factor)))
        self.pre_module = pre_module
        self.post_module = post_module

    def encode(self, z: Tensor) -> Tensor:
        """latent [B, D, T_hop] -> codes [B, 1 + n_residual, T_hop / prod(downsample_factor)]."""
        z = self.pre_module(self.downsample(z))
        semantic_codes, z_semantic = self.semantic_quantizer.encode(z)
        residual_codes, _ = self.quantizer.encode(z - z_semantic)
        return torch.cat([semantic_codes, residual_codes], dim=1)

    def decode(self, codes: Tensor, pos_offset: int = 0, freqs: Tensor | None = None) -> Tensor:
        """codes [B, 1 + n_residual, T] -> latent [B, D, T * prod(downsample_factor)]; clamps out-of-range codes.
        freqs: the post-transformer's RoPE rows for positions pos_offset.. (a CUDA graph's static input)."""
        semantic = codes[:, :1].clamp(0, self.semantic_quantizer.codebook_size - 1)
        residual = codes[:, 1:].clamp(0, self.quantizer.codebook_size - 1)
        z = self.semantic_quantizer.decode(semantic) + self.quantizer.decode(residual)
        return self.upsample(self.post_module(z, pos_offset, freqs))


# ------------------------------------------------------------------------------------------- codec


class Encoder(nn.Module):
    def __init__(self, cc: CodecConfig):
        super().__init__()
        d = cc.encoder_dim
        blocks: list[nn.Module] = [CausalConv1d(1, d, 7)]
        for stride, n_t in zip(cc.encoder_rates, cc.encoder_transformer_layers):
            d *= 2
            blocks.append(EncoderBlock(d, stride, _transformer(cc, d, n_t, cc.encoder_transformer_window)))
        blocks += [Snake1d(d), CausalConv1d(d, cc.latent_dim, 3)]
        self.block = nn.Sequential(*blocks)

    def forward(self, wav: Tensor) -> Tensor:  # [B, 1, L] -> [B, latent_dim, L / hop_length]
        return self.block(wav)


class Decoder(nn.Module):
    def __init__(self, cc: CodecConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(cc.latent_dim, cc.decoder_dim, 7)]
        for i, stride in enumerate(cc.decoder_rates):
            layers.append(DecoderBlock(cc.decoder_dim // 2 ** i, cc.decoder_dim // 2 ** (i + 1), stride))
        c_out = cc.decoder_dim // 2 ** len(cc.decoder_rates)
        layers += [Snake1d(c_out), CausalConv1d(c_out, 1, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:  # [B, latent_dim, L] -> [B, 1, L * prod(decoder_rates)]
        return self.model(z)


def _transformer(cc: CodecConfig, dim: int, n_layer: int, window: int) -> WindowLimitedTransformer | None:
    """Codec transformer at width dim: head_dim from the config, heads = dim / head_dim and FFN width scaled like
    the release (3072 at 1024 = dim * intermediate_size / latent_dim)."""
    if n_layer == 0:
        return None
    return WindowLimitedTransformer(dim, n_layer, dim // cc.head_dim, cc.head_dim,
                                    dim * cc.intermediate_size // cc.latent_dim, window, cc.norm_eps, cc.rope_base)


class Codec(nn.Module):
    """The modded-DAC generator: `encoder`, `quantizer`, `decoder` as in the release's state dict."""

    def __init__(self, cc: CodecConfig):
        super().__init__()
        if cc.decoder_rates and math.prod(cc.decoder_rates) * math.prod(cc.downsample_factor) != cc.frame_length:
            raise RuntimeModelError(f"codec: decoder rates {cc.decoder_rates} x downsample {cc.downsample_factor} "
                                    f"!= frame_length {cc.frame_length}")
        self.cc = cc
        self.encoder = Encoder(cc)
        pre = _transformer(cc, cc.latent_dim, cc.rvq_n_layer, cc.rvq_window)
        post = _transformer(cc, cc.latent_dim, cc.rvq_n_layer, cc.rvq_window)
        self.quantizer = DownsampleResidualVectorQuantize(cc, pre, post)
        self.decoder = Decoder(cc)
        self._graphs: GraphedDecode | None = None

    @classmethod
    def from_weights(cls, cc: CodecConfig, weights: dict[str, Tensor], dtype=torch.float32, device="cpu") -> "Codec":
        """Build from folded release names (no `c.` prefix), cast to dtype on device."""
        with torch.device("meta"):
            codec = cls(cc)
        expected = set(codec.state_dict().keys())
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if missing or unexpected:
            raise RuntimeModelError(f"codec weights: missing {missing[:5]} ({len(missing)}), unexpected "
                                    f"{unexpected[:5]} ({len(unexpected)})")
        codec.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()},
                              assign=True, strict=True)
        return codec.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.model[0].conv.weight.dtype

    @torch.inference_mode()
    def decode(self, codes: Tensor, pos_offset: int = 0, graphed: bool = False) -> Tensor:
        """codes [B, 10, T] (int) -> waveform [B, 1, T * frame_length] in (-1, 1), in the codec dtype.

        graphed (CUDA only; ignored elsewhere): replay a CUDA graph of the whole decode for this (B, T), captured
        on first use (`GraphedDecode`): one launch from the host instead of several hundred; worth it where shapes
        repeat (fixed-size chunks, `decode_streaming(graphed=True)`)."""
        self._check_codes(codes)
        if graphed and codes.is_cuda:
            if self._graphs is None:
                self._graphs = GraphedDecode(self)
            return self._graphs(codes, pos_offset)
        return self.decoder(self.quantizer.decode(codes, pos_offset))

    @torch.inference_mode()
    def encode(self, wav: Tensor) -> Tensor:
        """waveform [B, 1, L] -> codes [B, 10, ceil(L / frame_length)] int64 (zero right-padding)."""
        if wav.ndim != 3 or wav.shape[1] != 1:
            raise RuntimeModelError(f"codec.encode: waveform shape {tuple(wav.shape)}, expected (B, 1, L)")
        fl = self.cc.frame_length
        wav = F.pad(wav.to(self.dtype), (0, -wav.shape[-1] % fl))
        return self.quantizer.encode(self.encoder(wav))

    @torch.inference_mode()
    def decode_streaming(self, codes: Tensor, chunk: int, history: int, graphed: bool = False):
        """Yield waveform chunks [B, 1, chunk * frame_length] (the last one may be shorter) for codes [B, 10, T].

        Each chunk is decoded with up to `history` preceding frames of context at their absolute RoPE positions, so
        the concatenation equals `decode(codes)` (up to float summation order) once history covers the receptive
        field (8 x 127 frames for the release's window-128, 8-layer post-transformer; in practice far less matters).
        graphed: decode through CUDA graphs (`decode`); the last chunk is then padded to a whole chunk (the codec
        is causal: padding after a frame does not change its audio), so that at most history / chunk + 1 shapes
        are ever captured.
        """
        if chunk < 1 or history < 0:
            raise RuntimeModelError(f"decode_streaming: chunk must be >= 1 and history >= 0, got {chunk}, {history}")
        fl, n = self.cc.frame_length, codes.shape[-1]
        for start in range(0, n, chunk):
            first = max(0, start - history)
            window = codes[..., first: start + chunk]
            if graphed and window.shape[-1] < start + chunk - first:
                window = F.pad(window, (0, start + chunk - first - window.shape[-1]))
            wav = self.decode(window, pos_offset=first, graphed=graphed)
            yield wav[..., (start - first) * fl: (min(start + chunk, n) - first) * fl]

    def _check_codes(self, codes: Tensor) -> None:
        if codes.ndim != 3 or codes.shape[1] != self.cc.n_codebooks:
            raise RuntimeModelError(
                f"codec.decode: codes shape {tuple(codes.shape)}, expected (B, {self.cc.n_codebooks}, T)")
        if codes.dtype.is_floating_point:
            raise RuntimeModelError(f"codec.decode: codes dtype {codes.dtype}, expected an integer dtype")


class GraphedDecode:
    """`Codec.decode` replayed from CUDA graphs, one per codes shape (B, T), each captured on its first call; the
    `max_graphs` most recently used are kept (each holds its activations: about 0.5 GB at 256 frames, bf16).

    A graph reads its codes and its post-transformer RoPE rows (positions pos_offset..) from static buffers that
    every call fills first, so one graph serves every pos_offset; its output is copied out before the next call.
    """

    def __init__(self, codec: Codec, max_graphs: int = 4):
        self.codec, self.max_graphs = codec, max_graphs
        self.graphs: dict[tuple, tuple] = {}  # (B, T) -> (graph, codes, freqs, wav), least recently used first

    def __call__(self, codes: Tensor, pos_offset: int) -> Tensor:
        key = tuple(codes.shape)
        entry = self.graphs.pop(key, None) or self._capture(codes)
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            del self.graphs[next(iter(self.graphs))]
        graph, codes_in, freqs_in, wav = entry
        codes_in.copy_(codes)
        freqs_in.copy_(self._rope(pos_offset, codes.shape[-1], codes.device))
        graph.replay()
        return wav.clone()

    def _rope(self, pos_offset: int, t: int, device) -> Tensor:
        return self.codec.quantizer.post_module.rope_rows(pos_offset, t, device)

    def _run(self, codes: Tensor, freqs: Tensor) -> Tensor:
        return self.codec.decoder(self.codec.quantizer.decode(codes, 0, freqs))

    def _capture(self, codes: Tensor) -> tuple:
        codes_in = codes.clone()
        freqs_in = self._rope(0, codes.shape[-1], codes.device).clone()
        side = torch.cuda.Stream(codes.device)
        side.wait_stream(torch.cuda.current_stream(codes.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN algorithm choice, kernel compilation
            self._run(codes_in, freqs_in)
        torch.cuda.current_stream(codes.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            wav = self._run(codes_in, freqs_in)
        return graph, codes_in, freqs_in, wav
