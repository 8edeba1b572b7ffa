"""Load a GGUF (v2/v3) file of a supported family into the internal weight layout (see mlxllama/weights.py).

The header is parsed here with bounds checks on every read (_read_header), because gguf.GGUFReader trusts
the file: a hostile array length makes it loop or allocate without limit, and it takes seconds to walk a
50k-token vocabulary. Tensor data stays in a read-only np.memmap; F32/F16 tensors are returned as views of it.

Q4_0, Q4_1 and Q8_0 are repacked exactly into MLX's affine layout (QuantizedWeight). K-quants (Q2_K..Q6_K), Q5_0,
Q5_1, IQ4_NL and IQ4_XS stay as the file's blocks (GGMLWeight, views of the file), and in a file that has any of them
Q4_0/Q4_1/Q8_0 stay so too, so that projections fused by a backend share one layout. Other types are refused.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

from .. import families
from ..config import ModelArgs, from_gguf_metadata
from ..errors import ModelFileError, shown as _show
from ..families import GGUF_TO_INTERNAL
from ..quant import ggml_affine
from ..weights import GGMLWeight, QuantizedWeight, check_weights

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays of ...
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 16  # a 405B LLaMA has ~1,100 tensors
MAX_METADATA = 1 << 16
MAX_KEY_LENGTH = (1 << 16) - 1  # the GGUF spec's limit
MAX_NAME_LENGTH = 63  # GGML_MAX_NAME - 1
# Metadata arrays become Python lists (~36 bytes an item): bound their total size, not only by the file's size.
# The largest real vocabularies (256k tokens + scores + types + merges) need about 1M items.
MAX_METADATA_ITEMS = 1 << 23

_SCALARS = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_SCALAR_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
              VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8",
              VT.FLOAT64: "<f8"}

_NATIVE = (QT.Q4_0, QT.Q4_1, QT.Q8_0)  # repacked exactly into MLX's affine layout
_DENSE = (QT.F32, QT.F16, QT.BF16)
# kept as the file's blocks (weights.GGMLWeight), exact; in a file with any of them, _NATIVE tensors are kept so too
_BLOCKS = (QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS)


@dataclass
class _TensorInfo:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # numpy order: the GGUF dims reversed (ne0, the fastest, is last)
    offset: int  # absolute position in the file
    nbytes: int


@dataclass
class _Header:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]


class _Bad(Exception):
    """A structural problem in the header; _read_header turns it into ModelFileError."""


_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0
        self.items_left = MAX_METADATA_ITEMS

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Bad(f"truncated header: {what} at offset {start} needs {n} bytes, file has {self.size}")
        self.pos = start + n
        return start

    def scalar(self, vtype: VT, what: str):
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def spend(self, n: int, what: str) -> None:
        if n > self.items_left:
            raise _Bad(f"{what} has {n} items; metadata arrays may hold {MAX_METADATA_ITEMS} items in all")
        self.items_left -= n

    def u32(self, what: str) -> int:
        return self.scalar(VT.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(VT.UINT64, what)

    def _string_at(self, pos: int, what: str) -> tuple[str, int]:
        """The string whose u64 length is at pos, and the offset after it (the checks and messages of take())."""
        if pos + 8 > self.size:
            raise _Bad(f"truncated header: {what} length at offset {pos} needs 8 bytes, file has {self.size}")
        start = pos + 8
        end = start + _U64.unpack_from(self.buf, pos)[0]
        if end > self.size:
            raise _Bad(f"truncated header: {what} at offset {start} needs {end - start} bytes, file has {self.size}")
        try:
            return str(self.buf[start:end], "utf-8"), end
        except UnicodeDecodeError:
            raise _Bad(f"{what} at offset {start} is not valid UTF-8") from None

    def string(self, what: str) -> str:
        text, self.pos = self._string_at(self.pos, what)
        return text

    def strings(self, n: int, what: str) -> list[str]:
        """n strings in a row (a vocabulary: tens of thousands); one that is cut short or not UTF-8 goes through
        _string_at, for its message."""
        out, buf, size, pos, unpack = [], self.buf, self.size, self.pos, _U64.unpack_from
        for k in range(n):
            end = pos + 8 + unpack(buf, pos)[0] if pos + 8 <= size else size + 1
            try:
                text = str(buf[pos + 8:end], "utf-8") if end <= size else None
            except UnicodeDecodeError:
                text = None
            if text is None:
                self._string_at(pos, f"{what}[{k}]")  # raises
            out.append(text)
            pos = end
        self.pos = pos
        return out

    def value(self, raw_type: int, what: str, depth: int = 0):
        try:
            vtype = VT(raw_type)
        except ValueError:
            raise _Bad(f"{what} has unknown value type {raw_type}") from None
        if vtype == VT.STRING:
            return self.string(what)
        if vtype != VT.ARRAY:
            return self.scalar(vtype, what)
        if depth >= MAX_NESTING:
            raise _Bad(f"{what} nests arrays more than {MAX_NESTING} deep")
        item_type = self.u32(f"{what} item type")
        n = self.u64(f"{what} length")
        if item_type in _SCALAR_NP:
            dtype = np.dtype(_SCALAR_NP[VT(item_type)])
            start = self.take(n * dtype.itemsize, f"{what} ({n} items)")
            self.spend(n, what)
            return np.frombuffer(self.buf[start:self.pos], dtype).tolist()
        # Each string or nested array takes at least 8 bytes: refuse absurd lengths before looping.
        if n * 8 > self.size - self.pos:
            raise _Bad(f"truncated header: {what} claims {n} items, more than the file can hold")
        self.spend(n, what)
        if item_type == VT.STRING:
            return self.strings(n, what)
        return [self.value(item_type, f"{what}[{k}]", depth + 1) for k in range(n)]


def _read_header(path: Path) -> _Header:
    """Parse and validate everything before the tensor data; touch no tensor bytes."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelFileError(f"{path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse_header(mm, size, path)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror or e})") from None
    except _Bad as e:
        raise ModelFileError(f"{path}: {e}") from None


def _parse_header(mm, size: int, path: Path) -> _Header:
    cur = _Cursor(mm, size)
    magic = bytes(mm[cur.take(4, "magic"):4])
    if magic != GGUF_MAGIC:
        raise _Bad(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version:
        raise _Bad("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # Smallest possible entries: key/name length + type (+ 1 value byte); tensor info adds n_dims and offset.
    if n_kv * 13 + n_tensors * 32 > size - cur.pos:
        raise _Bad(f"truncated header: {n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes")
    if n_tensors > MAX_TENSORS or n_kv > MAX_METADATA:
        raise _Bad(f"{n_tensors} tensors and {n_kv} metadata entries; at most {MAX_TENSORS} and {MAX_METADATA} "
                   "are accepted")

    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for k in range(n_kv):
        key = cur.string(f"metadata key #{k}")
        if len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise _Bad(f"metadata key #{k} {_show(key)} is too long or has control characters")
        if key in metadata:
            raise _Bad(f"duplicate metadata key {_show(key)}")
        raw_type = cur.u32(f"type of {_show(key)}")
        if key == "general.alignment" and raw_type != VT.UINT32:
            raise _Bad("general.alignment must be a uint32")
        metadata[key] = cur.value(raw_type, f"metadata {_show(key)}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
        raise _Bad(f"general.alignment {alignment} is not a power of two")

    raw_infos = []
    for k in range(n_tensors):
        name = cur.string(f"tensor name #{k}")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise _Bad(f"tensor name #{k} {_show(name)} is longer than {MAX_NAME_LENGTH} characters "
                       "or has control characters")
        n_dims = cur.u32(f"dimension count of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimensions of tensor {name}") for _ in range(n_dims)]
        raw_type = cur.u32(f"type of tensor {name}")
        offset = cur.u64(f"data offset of tensor {name}")
        raw_infos.append((name, dims, raw_type, offset))
    data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, _TensorInfo] = {}
    for name, dims, raw_type, offset in raw_infos:
        if name in tensors:
            raise _Bad(f"duplicate tensor name {name!r}")
        try:
            qtype = QT(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name} has unknown type {raw_type}") from None
        if min(dims) < 1:
            raise _Bad(f"tensor {name} has a zero dimension {dims}")
        if dims[0] % block:
            raise _Bad(f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
        n_elements = 1
        for d in dims:
            n_elements *= d
        if n_elements >= 1 << 63:
            raise _Bad(f"tensor {name}: dimensions {dims} overflow a 64-bit element count")
        nbytes = n_elements // block * type_size
        if offset % alignment:
            raise _Bad(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > size:
            raise _Bad(f"tensor {name}: data [{data_start + offset}, {data_start + offset + nbytes}) lies "
                       f"beyond the end of the file ({size} bytes); the file is truncated or corrupt")
        tensors[name] = _TensorInfo(name, qtype, tuple(reversed(dims)), data_start + offset, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise _Bad(f"the data of tensors {name0} and {name1} overlap")
    return _Header(version, metadata, tensors)


def read_gguf_metadata(path) -> dict:
    """The key/value metadata of a GGUF file (plus GGUF.version/tensor_count/kv_count), as GGUFReader's
    field.contents() would give it. Reads only the header."""
    return _read_header(Path(path)).metadata


def _internal_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(0|[1-9][0-9]*)\.([a-z_]+\.(?:weight|bias))", gguf_name)
    if m:
        template = GGUF_TO_INTERNAL.get(f"blk.{{i}}.{m[2]}")
        return template.format(i=int(m[1])) if template else None
    return None if "{i}" in gguf_name else GGUF_TO_INTERNAL.get(gguf_name)


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row indices that undo convert_hf_to_gguf's q/k permutation: hf = gguf[index]."""
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _is_supported(qtype: QT) -> bool:
    return qtype in _DENSE or qtype in _NATIVE or qtype in _BLOCKS


def _unsupported(name: str, qtype: QT) -> str:
    kinds = ", ".join(t.name for t in _NATIVE + _BLOCKS)
    return (f"tensor {name} has type {qtype.name}, which mlxllama does not run exactly (quantized types it runs: "
            f"{kinds}); use a file quantized to one of those")


def _repack(rows: np.ndarray, qtype: QT) -> QuantizedWeight:
    """Q4_0 / Q4_1 / Q8_0 rows of raw blocks -> MLX affine layout, group size 32, value for value."""
    return ggml_affine(GGMLWeight(qtype.name, rows, (rows.shape[0], rows.shape[1] // GGML_QUANT_SIZES[qtype][1] * 32)))


def _dense(raw: np.ndarray, info: _TensorInfo) -> np.ndarray:
    if info.qtype == QT.F32:
        return raw.view("<f4").reshape(info.shape)
    if info.qtype == QT.F16:
        return raw.view("<f2").reshape(info.shape)
    if info.qtype == QT.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    row_bytes = info.nbytes // (int(np.prod(info.shape[:-1])) or 1)
    return gguf.quants.dequantize(raw.reshape(*info.shape[:-1], row_bytes), info.qtype)


def _convert(data: np.memmap, info: _TensorInfo, row_index: np.ndarray | None, cols: slice = slice(None),
             keep_blocks: bool = False):
    """One tensor in the internal layout; cols (a distributed rank's part) is cut from the raw blocks where it falls
    on block boundaries, so the repack reads only that part. keep_blocks: every quantized type stays as stored."""
    raw = data[info.offset:info.offset + info.nbytes]
    if len(info.shape) == 2 and info.qtype not in _DENSE:
        rows = raw.reshape(info.shape[0], -1)
        if row_index is not None:
            rows = rows[row_index]
        c0, c1, _ = cols.indices(info.shape[1])
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        if (c0, c1) != (0, info.shape[1]):
            if c0 % block or c1 % block:
                raise ModelFileError(f"columns {c0}:{c1} of tensor {info.name} do not fall on its {info.qtype.name} "
                                     f"blocks of {block}")
            rows = rows[:, c0 // block * type_size: c1 // block * type_size]
        if info.qtype in _NATIVE and not keep_blocks:
            return _repack(rows, info.qtype)
        return GGMLWeight(info.qtype.name, rows, (rows.shape[0], rows.shape[1] // type_size * block))
    w = _dense(raw, info)
    w = w[row_index] if row_index is not None else w
    return w[:, cols] if w.ndim == 2 else w


def _release_pages(data: np.memmap, offset: int, nbytes: int) -> None:
    """Drop a converted tensor's file pages from this process's resident set (they stay in the page cache), so
    that the file and the repacked copy are not both resident while the rest loads."""
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(len(mm), -(-(offset + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        pass


def _torch_dtype(qtype: QT) -> str:
    return {QT.BF16: "bfloat16", QT.F32: "float32"}.get(qtype, "float16")


def load_gguf(path, shard=None) -> tuple[ModelArgs, dict[str, np.ndarray | QuantizedWeight | GGMLWeight], dict]:
    """(args, weights in the internal layout, metadata). Raises ModelFileError (ConfigError for metadata).
    shard: see loaders.load; the kept rows and columns are cut before conversion (repacks work row by row)."""
    path = Path(path)
    source = str(path)
    header = _read_header(path)
    meta = header.metadata
    args = from_gguf_metadata(meta, source)

    infos: dict[str, _TensorInfo] = {}
    rope_freqs = None
    for name, info in header.tensors.items():
        if name == "rope_freqs.weight":
            rope_freqs = info
            continue
        internal = _internal_name(name)
        if internal is None:
            raise ModelFileError(f"{path}: unexpected tensor {name}")
        if internal in infos:
            raise ModelFileError(f"{path}: tensors {infos[internal].name} and {name} both map to {internal}")
        if not _is_supported(info.qtype):
            raise ModelFileError(f"{path}: {_unsupported(name, info.qtype)}")
        infos[internal] = info
    embed = infos.get("model.embed_tokens")
    args = args.replace(tie_word_embeddings="lm_head" not in infos,
                        torch_dtype=_torch_dtype(embed.qtype) if embed else args.torch_dtype,
                        qkv_bias="model.layers.0.self_attn.q_proj.bias" in infos,
                        o_bias="model.layers.0.self_attn.o_proj.bias" in infos)
    if rope_freqs is not None:
        want = (args.head_dim // 2,)
        if rope_freqs.shape != want or rope_freqs.qtype not in _DENSE:
            raise ModelFileError(f"{path}: rope_freqs.weight is {rope_freqs.qtype.name} {rope_freqs.shape}, "
                                 f"expected float {want}")
    check_weights(infos, args, source)  # shapes only: nothing has been read yet

    data = np.memmap(path, dtype=np.uint8, mode="r")
    if rope_freqs is not None:
        factors = _dense(data[rope_freqs.offset:rope_freqs.offset + rope_freqs.nbytes], rope_freqs)
        args = args.replace(rope_freq_factors=[float(x) for x in factors])

    weights: dict[str, np.ndarray | QuantizedWeight | GGMLWeight] = {}
    keep_blocks = any(i.qtype in _BLOCKS and len(i.shape) == 2 for i in infos.values())
    permuted = families.by_name(args.family).gguf_permuted
    for internal, info in infos.items():
        part = (slice(None), slice(None)) if shard is None else shard(args, internal, info.shape)
        if part is None:
            continue
        rows, cols = part
        row_index = None
        if permuted and internal.endswith(("self_attn.q_proj", "self_attn.q_proj.bias")):
            row_index = _unpermute_rows(info.shape[0], args.num_attention_heads)
        elif permuted and internal.endswith(("self_attn.k_proj", "self_attn.k_proj.bias")):
            row_index = _unpermute_rows(info.shape[0], args.num_key_value_heads)
        if rows != slice(None):
            row_index = (np.arange(info.shape[0]) if row_index is None else row_index)[rows]
        try:
            weights[internal] = _convert(data, info, row_index, cols, keep_blocks)
        except (ValueError, TypeError, ArithmeticError, NotImplementedError) as e:
            raise ModelFileError(f"{path}: cannot convert tensor {info.name} ({info.qtype.name}): {e}") from None
        if isinstance(weights[internal], QuantizedWeight):
            _release_pages(data, info.offset, info.nbytes)  # repacked: its file pages need not stay resident
    if shard is None:
        check_weights(weights, args, source)
    return args, weights, meta
