"""MLX folders (mlx-community layout): config.json with a `quantization` section, `.scales`/`.biases` beside weights."""

from __future__ import annotations

import errno
import glob
import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from ..config import ModelArgs
from ..errors import ModelFileError, plain, shown
from ..weights import QuantizedWeight, check_weights
from .safetensors_io import file_name, internal_name, read_tensors


def read_mlx_weights(folder: Path, args: ModelArgs, lazy_bf16: bool = False) -> dict:
    tensors = read_tensors(folder, lazy_bf16)
    q = args.quantization or {}
    weights: dict = {}
    for name, arr in tensors.items():
        base = internal_name(name)
        if name.endswith((".scales", ".biases")):
            stem = name[: -len(".scales")]
            if stem + ".weight" not in tensors:
                raise ModelFileError(f"{folder}: {plain(name)} has no matching {plain(stem)}.weight")
            continue
        if name.endswith(".weight") and (base + ".scales" in tensors or base + ".biases" in tensors):
            weights[base] = _quantized(folder, base, arr, tensors, _layer_quant(q, base))
        else:
            if arr.dtype not in (np.float16, np.float32):
                raise ModelFileError(f"{folder}: tensor {shown(name)} has dtype {arr.dtype}, expected a float type")
            weights[base] = arr
    if args.tie_word_embeddings:
        weights.pop("lm_head", None)
    check_weights(weights, args, str(folder))
    return weights


def _quantized(folder: Path, base: str, arr: np.ndarray, tensors: dict, layer_q: dict) -> QuantizedWeight:
    scales, biases = tensors.get(base + ".scales"), tensors.get(base + ".biases")
    if scales is None or biases is None:
        raise ModelFileError(f"{folder}: {plain(base)} needs both .scales and .biases")
    bits, group = layer_q.get("bits"), layer_q.get("group_size")
    if bits is None or group is None:
        raise ModelFileError(f"{folder}: {plain(base)} is quantized but config.json has no quantization section")
    if arr.dtype != np.uint32 or arr.ndim != 2 or scales.shape != biases.shape or scales.ndim != 2:
        raise ModelFileError(f"{folder}: quantized tensor {plain(base)} has inconsistent weight/scales/biases")
    if scales.shape[0] != arr.shape[0] or scales.shape[1] * group != arr.shape[1] * 32 // bits \
            or arr.shape[1] * 32 % bits:
        raise ModelFileError(f"{folder}: {plain(base)} is not {bits}-bit with group size {group} "
                             f"(weight {arr.shape}, scales {scales.shape})")
    if scales.dtype not in (np.float16, np.float32) or biases.dtype != scales.dtype:
        raise ModelFileError(f"{folder}: {plain(base)}.scales and .biases have dtypes {scales.dtype} and "
                             f"{biases.dtype}; expected the same float type")
    return QuantizedWeight(arr, scales, biases, group, bits)


def _layer_quant(q: dict, base: str) -> dict:
    """mlx-lm may override quantization per layer (`"model.layers.0.mlp.down_proj": {...}`) in the config."""
    override = q.get(base)
    if isinstance(override, dict):
        return override
    return q


PARTIAL = ".partial-"


def save_mlx(folder: Path, args: ModelArgs, weights: dict, tokenizer, force: bool = False) -> Path:
    """Write an MLX folder atomically: a temporary sibling folder, then one rename. mlx-lm loads the result.

    An interrupted or failed write leaves no `folder`; the temporary folder (.NAME.partial-PID-*) is removed,
    or, after a crash, by the next save into the same parent."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    if folder.exists() and not force:
        raise ModelFileError(f"{folder} already exists; pass --force to replace it")
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ModelFileError(f"cannot write {folder}: {parent} is a file, not a folder")
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(folder)
        tmp = folder.with_name(f".{folder.name}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
        tensors = {}
        for name, w in weights.items():
            if isinstance(w, QuantizedWeight):
                tensors[name + ".weight"] = np.ascontiguousarray(w.weight)
                tensors[name + ".scales"] = np.ascontiguousarray(w.scales)
                tensors[name + ".biases"] = np.ascontiguousarray(w.biases)
            else:
                tensors[file_name(name)] = np.ascontiguousarray(w)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(args.to_hf_dict(), indent=2))
        tokenizer.save(tmp)
        mode = 0o666 & ~_umask()  # safetensors' writer creates 0600 files; every file follows the umask
        for p in tmp.iterdir():
            os.chmod(p, mode)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if not force:
            _rename_new(tmp, folder)
        elif folder.exists() or folder.is_symlink():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            tmp.rename(folder)
        tmp = None
        _fsync_dir(folder.parent)
    except ModelFileError:
        raise
    except Exception as e:
        # OSError from Python, SafetensorError or a plain Exception from the Rust writers: all are I/O here.
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(f"cannot write {folder}: {reason}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _rename_new(tmp: Path, folder: Path) -> None:
    """Rename tmp to a folder that must not exist: a rename onto a non-empty folder fails, so of two saves racing
    to one new folder exactly one wins."""
    try:
        os.rename(tmp, folder)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) or folder.exists():
            raise ModelFileError(f"{folder} already exists; pass --force to replace it") from None
        raise


def _remove_stale_partials(folder: Path) -> None:
    """Temporary folders left by a save that was killed: their process is gone."""
    for p in folder.parent.glob(f".{glob.escape(folder.name)}{PARTIAL}*"):
        pid = p.name[len(folder.name) + 1 + len(PARTIAL):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
