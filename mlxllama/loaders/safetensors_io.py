"""Validated, memory-mapped safetensors reading (bf16 included, which safetensors' numpy API lacks), shared by
the HF and MLX folder loaders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFileError, shown

MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
MAX_INDEX = 64 * 1024 * 1024  # model.safetensors.index.json: ~100 bytes a tensor
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I32": np.int32,
          "I64": np.int64, "U8": np.uint8, "I8": np.int8, "F64": np.float64}


def read_header(path: Path) -> tuple[dict, int]:
    """Returns ({name: {dtype, shape, data_offsets}}, start of the data section); validates everything."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise ModelFileError(f"{path}: safetensors header length {n} is beyond the file or the 100 MB limit")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ModelFileError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise ModelFileError(f"{path}: tensor {shown(name)} has a malformed entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise ModelFileError(f"{path}: tensor {shown(name)} has unsupported dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                                                  for d in shape) or len(shape) > 8:
            raise ModelFileError(f"{path}: tensor {shown(name)} has an invalid shape {shown(shape)}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in offs):
            raise ModelFileError(f"{path}: tensor {shown(name)} has invalid data_offsets {shown(offs)}")
        begin, end = offs
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype]).itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
            raise ModelFileError(f"{path}: tensor {shown(name)} data [{begin}, {end}) does not match its shape "
                                 f"{shown(shape)} and {dtype} within the {data_len}-byte data section")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelFileError(f"{path}: tensors {shown(n0)} and {shown(n1)} overlap")
    return header, data_start


class BF16:
    """A bfloat16 tensor not read yet (lazy_bf16): slicing keeps it unread; np.asarray widens it to float32, exactly."""

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray):
        self.raw = raw  # uint16 view of the file

    shape = property(lambda self: self.raw.shape)
    ndim = property(lambda self: self.raw.ndim)
    nbytes = property(lambda self: self.raw.size * 4)

    def __getitem__(self, key) -> "BF16":
        return BF16(self.raw[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        w = (self.raw.astype(np.uint32) << 16).view(np.float32)
        return w if dtype is None else w.astype(dtype)


def load(path: Path, lazy_bf16: bool = False) -> dict[str, np.ndarray]:
    """Tensors as read-only memmap views; bf16 widened to float32 (exact), or left as BF16 views with lazy_bf16."""
    header, start = read_header(path)
    if not header:
        return {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dt = DTYPES[info["dtype"]]
        arr = mm[start + begin: start + end].view(dt).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = BF16(arr) if lazy_bf16 else np.asarray(BF16(arr))
        out[name] = arr
    return out


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json; refuses pickles."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            if index.stat().st_size > MAX_INDEX:
                raise ModelFileError(f"{index}: larger than {MAX_INDEX >> 20} MiB")
            wm = json.loads(index.read_bytes())["weight_map"]
            files = sorted(set(wm.values()), key=str)
        except OSError as e:
            raise ModelFileError(f"{index}: cannot read ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
            raise ModelFileError(f"{index}: malformed index (expected a weight_map object)") from None
        for f in files:
            if not isinstance(f, str) or not f or "/" in f or "\\" in f or f.startswith(".") or not f.isprintable():
                raise ModelFileError(f"{index}: shard name {shown(f)} is not a plain file name")
        paths = [folder / f for f in files]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ModelFileError(f"{folder}: shard {missing[0]} named in model.safetensors.index.json is missing")
        return paths
    paths = sorted(folder.glob("*.safetensors"))
    if paths:
        return paths
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFileError(f"{folder}: only pickle weights ({pickles[0]}) found; mlxllama never unpickles. "
                             "Use a safetensors or GGUF copy of this model")
    raise ModelFileError(f"{folder}: no *.safetensors weights found")


def internal_name(name: str) -> str:
    """HF and MLX names equal the internal ones without the `.weight` suffix."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def file_name(internal: str) -> str:
    """The inverse of internal_name: biases keep their name, everything else gains `.weight`."""
    return internal if internal.endswith(".bias") else internal + ".weight"


def read_tensors(folder: Path, lazy_bf16: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a folder's safetensors files (one or sharded), by file name."""
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(folder):
        for name, arr in load(path, lazy_bf16).items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name in tensors:
                raise ModelFileError(f"{path}: tensor {shown(name)} appears in two shards")
            tensors[name] = arr
    return tensors
