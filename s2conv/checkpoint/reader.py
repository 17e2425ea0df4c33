"""Open and validate an S2 Pro checkpoint directory (or Hugging Face repo id) and read its tensors lazily.

`open_checkpoint` checks names, shapes and dtypes of the model safetensors and of codec.pth against the schema and
reports every problem in one CheckpointError. Tensor data is only read on demand (safetensors and codec.pth are
memory-mapped); `Checkpoint.check_values` scans all values for NaN/Inf, one tensor at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from s2conv.checkpoint.safetensors_io import TORCH_DTYPES, read_header
from s2conv.codec_schema import codec_config_from_shapes, codec_tensor_shapes
from s2conv.errors import CheckpointError
from s2conv.schema import CodecConfig, S2Config, component_of, hf_to_model_name, model_tensor_shapes

log = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_LISTED_PROBLEMS = 12
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHECK_CHUNK_ELEMENTS = 1 << 24


class Checkpoint:
    """A validated checkpoint. Model tensors are addressed by fish-speech model names (`layers.0.attention.wqkv.weight`,
    `fast_output.weight`, `codebook_embeddings.weight`), codec tensors by release names without `generator.`."""

    def __init__(self, path: Path, config: S2Config, codec_config: CodecConfig, model_index: dict,
                 codec_state: dict[str, torch.Tensor], codec_path: Path, tokenizer_path: Path,
                 tokenizer_config_path: Path | None):
        self.path = path
        self.config = config
        self.codec_config = codec_config
        self.tokenizer_path = tokenizer_path
        self.tokenizer_config_path = tokenizer_config_path
        self.codec_path = codec_path
        self._model = model_index  # model name -> (file, hf name, torch dtype, shape), release order
        self._codec = codec_state  # release name -> tensor (memory-mapped)
        self._headers: dict[Path, tuple] = {}  # file -> (read_header result), read lazily
        self._hash: str | None = None

    # -- model ----------------------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self._model)

    def _entry(self, name: str):
        try:
            return self._model[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no model tensor {name!r}") from None

    def model_shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[3]

    def model_dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[2]

    def model_file(self, name: str) -> Path:
        return self._entry(name)[0]

    def model_tensor(self, name: str) -> torch.Tensor:
        """The tensor in its source dtype, read from its safetensors file into fresh memory.

        Plain positioned reads rather than a memory map: mapped pages stay resident in the process (its RSS grows to
        the whole 9 GB of shards over an export), while a read buffer is freed with the tensor."""
        file, hf_name, _, _ = self._entry(name)
        header = self._headers.get(file)
        if header is None:
            header = self._headers[file] = read_header(file)  # validated at open: offsets inside the file
        info, data_start = header[0][hf_name], header[1]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        try:
            with open(file, "rb") as fh:
                fh.seek(data_start + begin)
                got = fh.readinto(memoryview(buf.numpy()))
        except OSError as e:
            raise CheckpointError(f"{file.name}: cannot read {hf_name}: {e.strerror or e}") from None
        if got != end - begin:
            raise CheckpointError(f"{file.name}: truncated: {hf_name} needs {end - begin} bytes, found {got}")
        return buf.view(TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])

    # -- codec ----------------------------------------------------------------------------------------------------
    def codec_names(self) -> list[str]:
        return list(self._codec)

    def codec_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.codec_tensor(name).shape)

    def codec_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._codec[name]
        except KeyError:
            raise CheckpointError(f"{self.codec_path.name}: no codec tensor {name!r}") from None

    # -- summaries ------------------------------------------------------------------------------------------------
    def n_params(self) -> dict[str, int]:
        """Parameter counts per component: slow_ar, fast_ar, embeddings (token + codebook + fast), codec."""
        out = {"slow_ar": 0, "fast_ar": 0, "embeddings": 0, "codec": 0}
        for name, (_, _, _, shape) in self._model.items():
            out[component_of(name)] += math.prod(shape)
        out["codec"] = sum(t.numel() for t in self._codec.values())
        return out

    def content_hash(self) -> str:
        """sha256 (hex) over config.json, the model safetensors files (name order) and codec.pth; streamed, cached."""
        if self._hash is None:
            h = hashlib.sha256()
            files = [self.path / "config.json"] + sorted({e[0] for e in self._model.values()}) + [self.codec_path]
            for f in files:
                h.update(f.name.encode() + b"\0")
                with open(f, "rb") as fh:
                    while block := fh.read(1 << 23):
                        h.update(block)
            self._hash = h.hexdigest()
        return self._hash

    def check_values(self, progress=None) -> int:
        """Scan every model and codec tensor for NaN/Inf (row blocks of one tensor at a time).

        progress: optional callable(name) called before each tensor. Returns the number of tensors checked;
        raises one CheckpointError listing every tensor with non-finite values.
        """
        problems = []
        names = [("model", n) for n in self._model] + [("codec", n) for n in self._codec]
        for kind, name in names:
            if progress is not None:
                progress(name)
            t = self.model_tensor(name) if kind == "model" else self.codec_tensor(name)
            flat = t.reshape(-1)
            n_nan = n_inf = 0
            for i in range(0, flat.numel(), _CHECK_CHUNK_ELEMENTS):
                a, b = _count_nonfinite(flat[i:i + _CHECK_CHUNK_ELEMENTS])
                n_nan, n_inf = n_nan + a, n_inf + b
            if n_nan:
                problems.append(f"NaN in {kind} tensor {name} ({n_nan} values)")
            if n_inf:
                problems.append(f"Inf in {kind} tensor {name} ({n_inf} values)")
        _raise_problems(self.path, problems)
        return len(names)

    def close(self) -> None:
        self._headers.clear()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._model)} model + {len(self._codec)} codec tensors)"


# ---------------------------------------------------------------------------------------------------------------


def open_checkpoint(path_or_repo_id: str | Path) -> Checkpoint:
    """Open a checkpoint directory (or an `owner/name` Hugging Face repo id) and validate its structure.

    Checks: config.json parses; the safetensors shards named by the index exist, are complete and hold exactly the
    tensors of `schema.model_tensor_shapes(config)` with those shapes and a float dtype; tokenizer.json exists;
    codec.pth loads safely (weights only) and holds the codec weights for the config derived from its shapes.
    Raises one CheckpointError listing all problems. Values are not scanned: see `Checkpoint.check_values`.
    """
    path = _resolve(path_or_repo_id)
    config = _read_config(path)
    problems: list[str] = []

    model_index = _index_model(path, config, problems)
    tok = path / "tokenizer.json"
    if not tok.is_file():
        problems.append("missing tokenizer.json")
    tok_cfg = path / "tokenizer_config.json"

    codec_path = path / "codec.pth"
    codec_state: dict[str, torch.Tensor] = {}
    codec_config = CodecConfig()
    if not codec_path.is_file():
        problems.append("missing codec.pth")
    else:
        try:
            codec_state, codec_config = _load_codec(codec_path, problems)
        except CheckpointError as e:
            problems.append(str(e))
    _raise_problems(path, problems)
    return Checkpoint(path, config, codec_config, model_index, codec_state, codec_path, tok,
                      tok_cfg if tok_cfg.is_file() else None)


def _resolve(arg: str | Path) -> Path:
    p = Path(arg).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise CheckpointError(f"{arg}: not a directory (expected a checkpoint directory with config.json)")
    text = str(arg)
    if not _REPO_ID_RE.match(text):
        raise CheckpointError(f"{arg}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{arg}: no such directory, and huggingface_hub is not installed to fetch it as a "
                              f"Hugging Face repo (pip install 's2conv[hub]')") from None
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as e:  # not in the local cache (huggingface_hub raises several types)
        log.info("%s not in the local Hugging Face cache (%s); downloading", text, type(e).__name__)
    try:
        return Path(snapshot_download(text))
    except Exception as e:  # network, auth, missing repo: all one line for the user
        raise CheckpointError(f"{arg}: no such directory, and downloading it from the Hugging Face Hub failed "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _read_config(path: Path) -> S2Config:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path}: missing config.json")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return S2Config.from_hf_config(cfg)


def _index_model(path: Path, config: S2Config, problems: list[str]) -> dict:
    """Map model name -> (file, hf name, dtype, shape) for the tensors found; append problems."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"{index_file.name}: malformed ({type(e).__name__}: {_first_line(e)})")
            return {}
    elif (path / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        problems.append("no model.safetensors or model.safetensors.index.json")
        return {}

    found: dict[str, tuple] = {}  # hf name -> (file, dtype code, shape)
    for fname in files:
        f = path / fname
        if not f.is_file():
            problems.append(f"missing shard {fname}")
            continue
        try:
            header, _ = read_header(f)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for name, info in header.items():
            if weight_map is not None and weight_map.get(name) != fname:
                problems.append(f"{fname}: tensor {name} is not listed for this file in the index")
            found[name] = (f, info["dtype"], tuple(int(d) for d in info["shape"]))
    if weight_map is not None:
        present = {fname for fname in files if (path / fname).is_file()}
        for name, fname in weight_map.items():
            if fname in present and name not in found:
                problems.append(f"index lists {name} in {fname}, which does not contain it")

    expected = model_tensor_shapes(config)
    listed = set(found) | set(weight_map or ())
    for name in expected:
        if name not in listed:
            problems.append(f"missing {name}")
    for name in found:
        if name not in expected:
            problems.append(f"unexpected tensor {name}")
    out = {}
    for name, shape in expected.items():
        if name not in found:
            continue
        f, dtype_code, got = found[name]
        dtype = TORCH_DTYPES[dtype_code]
        if got != shape:
            problems.append(f"wrong shape {name}: {list(got)}, expected {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"non-float dtype {name}: {dtype_code}")
        out[hf_to_model_name(name)] = (f, name, dtype, got)
    return out


def _load_codec(path: Path, problems: list[str]) -> tuple[dict[str, torch.Tensor], CodecConfig]:
    """Load codec.pth safely (weights only, memory-mapped) and keep exactly the expected codec weights."""
    mmap = zipfile.is_zipfile(path)  # torch.load can only mmap the zip format
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ... for unsafe/corrupt files
        raise CheckpointError(f"codec.pth: cannot load safely as weights ({type(e).__name__}: {_first_line(e)})") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"codec.pth: expected a state dict, found {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any("generator" in k for k in state):
        state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cc = codec_config_from_shapes(shapes)
    expected = codec_tensor_shapes(cc)
    ignored = [k for k in state if k not in expected]
    if ignored:
        log.debug("codec.pth: ignoring %d non-weight entries such as %s", len(ignored), ignored[0])
    kept = {}
    for name, shape in expected.items():
        if name not in state:
            problems.append(f"missing codec tensor {name}")
            continue
        t = state[name]
        if tuple(t.shape) != shape:
            problems.append(f"wrong shape codec tensor {name}: {list(t.shape)}, expected {list(shape)}")
        if t.dtype not in FLOAT_DTYPES:
            problems.append(f"non-float dtype codec tensor {name}: {t.dtype}")
        kept[name] = t
    return kept, cc


# (exponent mask, mantissa mask) of the 16-bit float formats: all-ones exponent = Inf (mantissa 0) or NaN
_HALF_BITS = {torch.bfloat16: (0x7F80, 0x007F), torch.float16: (0x7C00, 0x03FF)}


def _count_nonfinite(x: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a 1-D CPU tensor. numpy, single-threaded: torch's thread pool costs more than the
    scan on small tensors, and 16-bit floats are tested on their bits without converting."""
    if x.dtype in _HALF_BITS:
        exp_mask, man_mask = _HALF_BITS[x.dtype]
        bits = x.view(torch.int16).numpy()
        special = (bits & exp_mask) == exp_mask
        if not special.any():
            return 0, 0
        nan = int((special & ((bits & man_mask) != 0)).sum())
        return nan, int(special.sum()) - nan
    a = x.numpy() if x.dtype in (torch.float32, torch.float64) else x.float().numpy()
    if np.isfinite(a).all():
        return 0, 0
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())


def _raise_problems(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = f"; ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    noun = "problem" if len(problems) == 1 else "problems"
    raise CheckpointError(f"checkpoint {path}: {len(problems)} {noun}: " + "; ".join(shown) + more)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
