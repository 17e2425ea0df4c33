"""Byte-level fuzzing of s2conv's GGUF readers: mutate valid files; the only acceptable outcomes are success or an
S2ConvError subclass (and, with the llama.cpp oracle, no file the C loader rejects may pass the validator).

    python scripts/fuzz.py --cases 100000 [--seed N] [--load-every 50] [--crash-dir fuzz-crashes]

Sources: a tiny s2conv q4 export, a tiny f16 export (s2.cpp's layout) and a minimal gguf-py file. Mutations: bit
flips, byte overwrites, header fields (counts, lengths, types, dims, offsets) set to edge values, truncation,
insertion, deletion. tests/reliability/test_fuzz.py runs a fixed budget of it in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s2conv.errors import S2ConvError
from s2conv.gguf_check import ARRAY, HEADER_BYTES, STRING, VALUE_TYPES, check_gguf

EDGE_U32 = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 63, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
EDGE_U64 = EDGE_U32 + [2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
CASE_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A valid file to mutate: its bytes, the end of its header (+ a margin) and the (offset, size) of every
    structural field (counts, lengths, type ids, dims, offsets)."""

    name: str
    path: Path
    data: bytes
    header_end: int
    fields: list[tuple[int, int]]


def header_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, byte size) of every count, length, type id, dimension and offset field of a *valid* GGUF file."""
    out = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = HEADER_BYTES

    def string(p: int) -> int:
        out.append((p, 8))
        return p + 8 + struct.unpack_from("<Q", data, p)[0]

    for _ in range(n_kv):
        pos = string(pos)
        out.append((pos, 4))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == ARRAY:
            out += [(pos, 4), (pos + 4, 8)]
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype == STRING:
                for _ in range(count):
                    pos = string(pos)
            else:
                pos += count * VALUE_TYPES[etype][1]
        elif vtype == STRING:
            pos = string(pos)
        else:
            pos += VALUE_TYPES[vtype][1]
    for _ in range(n_tensors):
        pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        out.append((pos, 4))
        pos += 4
        out += [(pos + 8 * d, 8) for d in range(n_dims)]
        pos += 8 * n_dims
        out += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return out


def load_source(name: str, path: Path) -> Source:
    data = Path(path).read_bytes()
    layout = check_gguf(path)
    return Source(name, Path(path), data, min(len(data), layout.data_offset + 256), header_fields(data))


def minimal_gguf(path: Path) -> Path:
    """A small file written by gguf-py's GGUFWriter: a few KV types, a string array, F32/F16/Q8_0/I8 tensors."""
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "fish-speech")
    w.add_uint32("fish-speech.block_count", 1)
    w.add_float32("fish-speech.rope.freq_base", 1e6)
    w.add_bool("fish_speech.attention_qk_norm", True)
    w.add_array("tokenizer.ggml.tokens", ["<|im_end|>", "a", "b"])
    w.add_array("fish_speech.codec.encoder_rates", [2, 4])
    w.add_string("general.name", "minimal")
    w.add_tensor("norm.weight", rng.standard_normal(32).astype(np.float32))
    w.add_tensor("embeddings.weight", rng.standard_normal((4, 32)).astype(np.float16))
    q8 = np.zeros((2, 34), dtype=np.uint8)
    q8[:, 2:] = rng.integers(0, 255, (2, 32))
    w.add_tensor("q.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("packed", rng.integers(-128, 127, (3, 5), dtype=np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_sources(ckpt_dir: Path, workdir: Path) -> list[Source]:
    """Export the checkpoint at `ckpt_dir` as q4 (s2conv) and f16 (s2.cpp layout), plus the minimal file."""
    from s2conv.converter import Policy, export_gguf

    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, type_ in (("s2conv-q4", "q4"), ("s2cpp-f16", "f16")):
        path = workdir / f"{name}.gguf"
        if not path.exists():
            export_gguf(ckpt_dir, path, Policy.from_options(type=type_), tokenizer_json=False)
        out.append(load_source(name, path))
    out.append(load_source("minimal", minimal_gguf(workdir / "minimal.gguf")))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Mutation:
    """In-place edits [(offset, bytes)], then an optional splice (offset, bytes removed, bytes inserted), then an
    optional truncation to `cut` bytes."""

    what: str
    edits: list[tuple[int, bytes]] = field(default_factory=list)
    splice: tuple[int, int, bytes] | None = None
    cut: int | None = None

    def apply(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for off, b in self.edits:
            buf[off:off + len(b)] = b
        if self.splice is not None:
            off, n, ins = self.splice
            buf[off:off + n] = ins
        if self.cut is not None:
            del buf[self.cut:]
        return bytes(buf)


def _offset(src: Source, rng: random.Random) -> int:
    """A header offset: mostly within 16 bytes of a structural field (where parsers go wrong), else anywhere."""
    if rng.random() < 0.7:
        off, size = rng.choice(src.fields)
        return min(src.header_end - 1, max(0, off + rng.randint(-16, size + 15)))
    return rng.randrange(src.header_end)


def mutate(src: Source, rng: random.Random) -> Mutation:
    """One random mutation, mostly inside the header (where parsing happens), sometimes in the tensor data."""
    n, h = len(src.data), src.header_end
    kind = rng.choices(["flip", "bytes", "field", "field", "truncate", "insert", "delete", "data"],
                       weights=[20, 12, 20, 15, 10, 8, 8, 7])[0]
    if kind == "flip":
        edits = []
        for _ in range(rng.randint(1, 4)):
            off = _offset(src, rng)
            b = src.data[off] ^ (1 << rng.randrange(8))
            edits.append((off, bytes([b])))
        return Mutation(f"flip bits at {[o for o, _ in edits]}", edits)
    if kind == "bytes":
        off = _offset(src, rng)
        b = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(rng.randint(1, 8)))
        return Mutation(f"overwrite {b.hex()} at {off}", [(off, b[: n - off])])
    if kind == "field":
        off, size = rng.choice(src.fields)
        (old,) = struct.unpack_from("<I" if size == 4 else "<Q", src.data, off)
        value = rng.choice(EDGE_U32 if size == 4 else EDGE_U64 + [n, n - off, n + 1, 2 * n])
        value = rng.choice([value, old + 1, max(old - 1, 0), old * 2, old + rng.randint(1, 64)])
        value &= (1 << (8 * size)) - 1
        return Mutation(f"field at {off} ({size} bytes): {old} -> {value}",
                        [(off, value.to_bytes(size, "little"))])
    if kind == "truncate":
        cut = _offset(src, rng) if rng.random() < 0.6 else rng.randrange(n)
        return Mutation(f"truncate to {cut}", cut=cut)
    if kind == "insert":
        off = _offset(src, rng)
        ins = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, rng.randint(1, 64)])))
        return Mutation(f"insert {len(ins)} bytes at {off}", splice=(off, 0, ins))
    if kind == "delete":
        off = _offset(src, rng)
        k = rng.choice([1, 4, 8, rng.randint(1, 64)])
        return Mutation(f"delete {k} bytes at {off}", splice=(off, k, b""))
    off = rng.randrange(h, n) if n > h else rng.randrange(n)  # tensor data: NaN/Inf/garbage values
    b = rng.choice([b"\xff\xff", b"\x00\x7c", b"\xff\xff\xff\x7f", b"\x00\x00\x80\x7f", os.urandom(16)])
    return Mutation(f"data bytes {b.hex()} at {off}", [(off, b[: n - off])])


class WorkFile:
    """One scratch file per source, patched in place per case and restored after it (a full rewrite only when a
    splice shifts bytes), so a 17 MB source costs a few KB of writes per case."""

    def __init__(self, src: Source, path: Path):
        self.src, self.path = src, path
        path.write_bytes(src.data)
        self.undo: list[tuple[int, bytes]] = []
        self.dirty = False  # the file differs from the source in more than `undo`

    def materialize(self, m: Mutation) -> Path:
        data = self.src.data
        if m.splice is not None:
            self.path.write_bytes(m.apply(data))
            self.dirty = True
            return self.path
        with open(self.path, "r+b") as f:
            for off, b in m.edits:
                f.seek(off)
                f.write(b)
                self.undo.append((off, data[off:off + len(b)]))
            if m.cut is not None:
                f.truncate(m.cut)
                self.undo.append((m.cut, data[m.cut:]))
        return self.path

    def restore(self) -> None:
        if self.dirty:
            self.path.write_bytes(self.src.data)
        else:
            with open(self.path, "r+b") as f:
                for off, b in reversed(self.undo):
                    f.seek(off)
                    f.write(b)
        self.undo.clear()
        self.dirty = False


# ---------------------------------------------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------------------------------------------


def read_everything(path: Path) -> None:
    """What `inspect` and the loader's metadata stage do: validate, open with GGUFFile, decode every metadata value
    and every tensor's format and shape, and build the inspect report (text and JSON)."""
    from s2conv.converter.inspect_gguf import format_inspect, inspect_gguf
    from s2conv.gguf_io import GGUFFile

    check_gguf(path)
    f = GGUFFile(path)
    for key in f.keys():
        f.get(key)
    for name in f.tensors:
        try:
            f.tensor_shape(name)
        except S2ConvError:
            pass  # one clean error per tensor is fine; keep looking at the others
    info = inspect_gguf(path)
    format_inspect(info)
    json.dumps(info)


def load_everything(path: Path) -> None:
    """The runtime loader: model, codec and tokenizer built from the file."""
    from s2conv.runtime.loader import load_model

    load_model(path)


class _Timeout(BaseException):
    """Raised by SIGALRM inside a case that runs too long (a hang); BaseException so library code cannot eat it."""


def _alarm(signum, frame):
    raise _Timeout(f"case ran longer than {CASE_TIMEOUT_S} s")


@dataclass
class Stats:
    cases: int = 0
    ok: int = 0
    clean_errors: int = 0
    crashes: int = 0
    loads: int = 0
    oracle_checked: int = 0
    oracle_disagreements: int = 0
    by_source: dict = field(default_factory=dict)
    crash_reports: list = field(default_factory=list)  # (case, source, mutation, traceback)
    max_rss_growth_mb: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.cases} cases: {self.ok} ok, {self.clean_errors} clean errors, {self.crashes} crashes; "
                f"{self.loads} through load_model; oracle checked {self.oracle_checked}, disagreements "
                f"{self.oracle_disagreements}; peak RSS growth {self.max_rss_growth_mb:.0f} MB; "
                f"{self.seconds:.1f} s")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def c_loader_accepts(oracle, path: Path) -> bool:
    """Whether llama.cpp's gguf_init_from_file accepts the file *with* its data (no_alloc=false).

    The header is checked with no_alloc=true and the data check (the loader reads data_offset + the padded sizes)
    done here: with no_alloc=false the C loader first allocates the data size the header claims, and a forged
    211 TB tensor aborts the process in ggml_init (GGML_ASSERT(ctx->mem_buffer != NULL)), found by this fuzzer."""
    try:
        ok, info = oracle.gguf_open(path)
    except UnicodeDecodeError:  # accepted by C; the test wrapper then fails to decode a non-UTF-8 key
        return True
    if not ok:
        return False
    data = sum(-(-t.size // info.alignment) * info.alignment for t in info.tensors)
    return not info.tensors or info.data_offset + data <= Path(path).stat().st_size


def run_case(path: Path, load: bool, oracle=None) -> tuple[str, bool | None]:
    """("ok" | "error", C loader verdict or None). Anything but an S2ConvError propagates (a crash)."""
    c_ok = c_loader_accepts(oracle, path) if oracle is not None else None
    try:
        read_everything(path)
        if load:
            load_everything(path)
    except S2ConvError:
        return "error", c_ok
    return "ok", c_ok


def fuzz(sources: list[Source], cases: int, seed: int = 0, *, load_every: int = 0, weights: list[float] | None = None,
         oracle=None, crash_dir: Path | None = None, keep_crashes: int = 5, progress_every: int = 0,
         workdir: Path | None = None, log=print) -> Stats:
    """Run `cases` mutated files (source chosen by `weights`); every `load_every`-th case also goes through
    load_model. Crashes (and oracle disagreements: the C loader rejects, s2conv accepts) are counted and the first
    `keep_crashes` saved with their traceback into `crash_dir`."""
    rng = random.Random(seed)
    stats = Stats(by_source={s.name: [0, 0, 0] for s in sources})
    tmp = Path(workdir or tempfile.mkdtemp(prefix="s2conv-fuzz-"))
    work = {s.name: WorkFile(s, tmp / f"work-{s.name}.gguf") for s in sources}
    import s2conv.converter.inspect_gguf  # noqa: F401  (import torch & co. before measuring memory)
    import s2conv.runtime.loader  # noqa: F401

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(cases):
            src = rng.choices(sources, weights=weights)[0]
            m = mutate(src, rng)
            load = load_every > 0 and i % load_every == 0
            path = work[src.name].materialize(m)
            problem = None
            signal.alarm(CASE_TIMEOUT_S)
            try:
                outcome, c_ok = run_case(path, load, oracle)
            except (Exception, _Timeout):  # a crash: anything but S2ConvError
                problem, outcome, c_ok = traceback.format_exc(), "crash", None
            finally:
                signal.alarm(0)
            if c_ok is not None:
                stats.oracle_checked += 1
                if c_ok is False and outcome == "ok":
                    stats.oracle_disagreements += 1
                    problem = "the C loader rejects this file but s2conv accepted it"
            stats.cases += 1
            stats.loads += load
            stats.ok += outcome == "ok"
            stats.clean_errors += outcome == "error"
            stats.crashes += outcome == "crash"
            stats.by_source[src.name][("ok", "error", "crash").index(outcome)] += 1
            if problem is not None:
                stats.crash_reports.append((i, src.name, m.what, problem))
                if crash_dir is not None and len(stats.crash_reports) <= keep_crashes:
                    crash_dir.mkdir(parents=True, exist_ok=True)
                    (crash_dir / f"case-{i}-{src.name}.gguf").write_bytes(m.apply(src.data))
                    (crash_dir / f"case-{i}-{src.name}.txt").write_text(f"{m.what}\n\n{problem}")
            work[src.name].restore()
            if progress_every and (i + 1) % progress_every == 0:
                stats.seconds = time.perf_counter() - t0
                log(f"[fuzz] {stats.line()}")
    finally:
        signal.signal(signal.SIGALRM, old)
        stats.seconds = time.perf_counter() - t0
        stats.max_rss_growth_mb = _rss_mb() - rss0
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-every", type=int, default=50, help="every N-th case also runs load_model (0: never)")
    p.add_argument("--checkpoint", type=Path, help="tiny checkpoint directory (default: generate one)")
    p.add_argument("--workdir", type=Path, help="where sources and scratch files go (default: a temp dir)")
    p.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    p.add_argument("--keep", type=int, default=5, help="crashing inputs saved with their traceback")
    p.add_argument("--oracle", action="store_true", help="also run llama.cpp's C loader (needs llama-cpp-python)")
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="s2conv-fuzz-"))
    ckpt = args.checkpoint
    if ckpt is None:
        from s2conv.checkpoint import make_checkpoint

        ckpt = work / "tiny"
        if not (ckpt / "config.json").exists():
            make_checkpoint("tiny", ckpt, seed=0)
    sources = make_sources(ckpt, work)
    oracle = None
    if args.oracle:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from oracle import load_ggml

        oracle = load_ggml()
        if oracle is None:
            print("llama.cpp oracle not installed: bash scripts/install_oracle.sh", file=sys.stderr)
            return 2
    print(f"[fuzz] sources: {', '.join(f'{s.name} ({len(s.data):,} bytes)' for s in sources)}; seed {args.seed}")
    stats = fuzz(sources, args.cases, args.seed, load_every=args.load_every, oracle=oracle, crash_dir=args.crash_dir,
                 keep_crashes=args.keep, progress_every=max(1, min(1000, args.cases // 20)), workdir=work)
    print(f"[fuzz] done: {stats.line()}")
    for name, (ok, err, crash) in stats.by_source.items():
        print(f"[fuzz]   {name}: {ok} ok, {err} clean errors, {crash} crashes")
    for i, name, what, tb in stats.crash_reports[:args.keep]:
        print(f"[fuzz] case {i} ({name}, {what}):\n{tb}")
    if stats.crash_reports:
        print(f"[fuzz] first {min(args.keep, len(stats.crash_reports))} crashing inputs saved in {args.crash_dir}")
    return 1 if stats.crash_reports else 0


if __name__ == "__main__":
    sys.exit(main())
