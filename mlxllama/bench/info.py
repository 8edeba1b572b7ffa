"""What `mlxllama info` reports: platform, versions, backends, device, chip and its rated bandwidth."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from .. import __version__, backends


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def system_info() -> dict[str, str]:
    out = {
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": sys.version.split()[0],
        "mlxllama": __version__,
        "numpy": _version("numpy"),
        "mlx": _version("mlx"),
    }
    available = ["numpy"] + (["mlx"] if backends.mlx_importable() else [])
    out["backends"] = ", ".join(available)
    out["auto picks"] = backends.pick("auto") + ("" if backends.mlx_has_gpu() else
                                                 " (MLX has no GPU here; numpy's BLAS is faster on a CPU)")
    if backends.mlx_importable():
        from ..backends.mlx_ops import MLXOps

        out["mlx device"] = MLXOps().device()
    try:
        from .hardware import detect

        hw = detect()
        out["machine"] = hw.describe() if hasattr(hw, "describe") else str(hw)
        chip = getattr(hw, "chip", None)
        if chip is not None:
            out["chip"] = chip.name
            out["rated bandwidth"] = f"{chip.bandwidth_gbps:g} GB/s"
        else:
            out["rated bandwidth"] = "unknown for this chip (bench --bandwidth sets it)"
    except ImportError:
        pass
    return out
