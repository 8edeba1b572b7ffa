"""MLX folders (mlx-community layout): config.json with a `quantization` section, `.scales`/`.biases` beside weights."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import ModelArgs, load_config
from ..errors import ModelFileError
from ..weights import QuantizedWeight, check_weights
from .hf import internal_name, read_tensors


def load_mlx(folder: Path) -> tuple[ModelArgs, dict]:
    args = load_config(folder / "config.json")
    tensors = read_tensors(folder)
    q = args.quantization or {}
    weights: dict = {}
    for name, arr in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = internal_name(name)
        if name.endswith(".weight") and base + ".scales" in tensors:
            scales, biases = tensors[base + ".scales"], tensors.get(base + ".biases")
            if biases is None:
                raise ModelFileError(f"{folder}: {base}.scales has no matching {base}.biases")
            layer_q = _layer_quant(q, base)
            bits, group = layer_q.get("bits"), layer_q.get("group_size")
            if arr.dtype != np.uint32 or arr.ndim != 2 or scales.shape != biases.shape or scales.ndim != 2:
                raise ModelFileError(f"{folder}: quantized tensor {base} has inconsistent weight/scales/biases")
            if scales.shape[0] != arr.shape[0] or scales.shape[1] * group != arr.shape[1] * 32 // bits:
                raise ModelFileError(f"{folder}: {base} is not {bits}-bit with group size {group} "
                                     f"(weight {arr.shape}, scales {scales.shape})")
            if scales.dtype not in (np.float16, np.float32):
                raise ModelFileError(f"{folder}: {base}.scales has dtype {scales.dtype}")
            weights[base] = QuantizedWeight(arr, scales, biases, group, bits)
        else:
            if arr.dtype not in (np.float16, np.float32):
                raise ModelFileError(f"{folder}: tensor {name!r} has dtype {arr.dtype}, expected a float type")
            weights[base] = arr
    if args.tie_word_embeddings:
        weights.pop("lm_head", None)
    check_weights(weights, args, str(folder))
    return args, weights


def _layer_quant(q: dict, base: str) -> dict:
    """mlx-lm may override quantization per layer (`"model.layers.0.mlp.down_proj": {...}`) in the config."""
    override = q.get(base)
    if isinstance(override, dict):
        return override
    return q


def save_mlx(folder: Path, args: ModelArgs, weights: dict, tokenizer, force: bool = False) -> Path:
    """Write an MLX folder atomically: a temporary sibling folder, then one rename. mlx-lm loads the result."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    if folder.exists() and not force:
        raise ModelFileError(f"{folder} already exists; pass --force to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        tensors = {}
        for name, w in weights.items():
            if isinstance(w, QuantizedWeight):
                tensors[name + ".weight"] = np.ascontiguousarray(w.weight)
                tensors[name + ".scales"] = np.ascontiguousarray(w.scales)
                tensors[name + ".biases"] = np.ascontiguousarray(w.biases)
            else:
                tensors[name + ".weight"] = np.ascontiguousarray(w)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(args.to_hf_dict(), indent=2))
        tokenizer.save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        for p in tmp.iterdir():
            p.chmod(0o666 & ~umask)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ModelFileError(f"cannot write {folder}: {e.strerror or e}") from None
        raise
    return folder
