"""Memory: will a model fit (weights as the backend holds them + KV cache + activations against what the device can
use), the Metal wired limit around generation, and handing freed heap pages back to the operating system.

Usable memory: on Metal the device's max_recommended_working_set_size (allocations past it fail or page: llama.cpp
#5206); on a CUDA GPU its memory; elsewhere MemAvailable from /proc/meminfo (Linux) or the physical memory; with a
chip from the table (`--chip`), each of its memory sizes times the share macOS lets the GPU wire by default.
Every input is injectable (`info=`, `meminfo=`), so the decisions are tested off the Mac.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from .accounting import kv_bytes as accounting_kv_bytes
from .errors import UsageError

logger = logging.getLogger(__name__)

GB = 1e9
_MiB = 1 << 20
QUERY_BLOCK = 128  # query rows whose float32 scores are held at once (numpy's block; a bound for the others)


class DoesNotFit(UsageError):
    """The model, its KV cache and activations need more memory than the device can use."""


def return_freed_memory(collect: bool = True) -> None:
    """glibc keeps the pages of freed heap blocks (a loader's arrays, for one); malloc_trim returns them. collect:
    a garbage collection first, for arrays held only by reference cycles (tens of ms with a tokenizer's objects
    alive: once per load, not per layer)."""
    if not sys.platform.startswith("linux"):
        return
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- what a model needs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryNeed:
    weights: int  # bytes resident: as the backend lays the weights out
    kv: int  # bytes of the KV cache at ctx x batch
    activations: int  # the largest transient of a prefill chunk (estimate)
    ctx: int
    batch: int
    kv_label: str  # "16-bit", "8-bit g64", "window 4096", ...
    float_bytes: int = 2
    settings: object = field(default=None, compare=False)  # the cache.CacheSettings it was computed for

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations


def weights_resident(weights: dict, ops) -> int:
    """Bytes the backend will hold for the loader's weights (accounting.weights_held)."""
    from .accounting import weights_held

    return weights_held(weights, ops)


def kv_bytes(args, ctx: int, batch: int, ops, settings=None) -> int:
    """Bytes of the KV cache `ops` keeps for `settings` (cache.for_backend), `batch` sequences of `ctx` positions (a
    rotating window holds at most its size)."""
    from .cache import for_backend

    return accounting_kv_bytes(args, ctx, batch, ops.float_bytes, for_backend(settings, ops))


def activation_bytes(args, ctx: int, batch: int = 1, float_bytes: int = 2, prefill_step: int = 512) -> int:
    """The transient of one prefill chunk: its hidden states, q/k/v, the MLP's gate and up, a block of float32
    attention scores against the whole context, and the last position's float32 logits."""
    rows = batch * max(1, min(ctx, prefill_step))
    H, KV, D = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    per_row = 3 * args.hidden_size + (H + 2 * KV) * D + 3 * args.intermediate_size
    scores = batch * H * min(rows, QUERY_BLOCK) * max(ctx, 1) * 4
    return rows * per_row * float_bytes + scores + batch * args.vocab_size * 4


def memory_need(args, weights_bytes: int, ctx: int, batch: int = 1, float_bytes: int = 2, settings=None,
                prefill_step: int = 512) -> MemoryNeed:
    from .cache import CacheSettings

    s = settings or CacheSettings()
    label = f"{s.kv_bits}-bit g{s.kv_group_size}" if s.kv_bits else \
        ("16-bit" if s.kv_dtype == "float16" else f"{8 * float_bytes}-bit")
    if s.max_kv_size:
        label += f", window {s.max_kv_size}"
    return MemoryNeed(weights=int(weights_bytes), kv=accounting_kv_bytes(args, ctx, batch, float_bytes, s),
                      activations=activation_bytes(args, ctx, batch, float_bytes, prefill_step),
                      ctx=ctx, batch=batch, kv_label=label, float_bytes=float_bytes, settings=s)


# -- what the device can use ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceMemory:
    usable: int | None  # bytes; None: unknown
    what: str  # "Metal recommended working set", "MemAvailable", "M2 Max 32 GB (~21 GB for the GPU)"
    metal: bool = False
    total: int | None = None  # physical memory, where known


def metal_info() -> dict | None:
    """mx.device_info() on Metal, else None."""
    try:
        import mlx.core as mx
    except Exception:  # noqa: BLE001  (no MLX, or one that cannot load here)
        logger.debug("MLX is not usable here", exc_info=True)
        return None
    if not mx.metal.is_available():
        return None
    return dict(mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info())


def parse_meminfo(text: str | None, field: str = "MemAvailable") -> int | None:
    """Bytes of one /proc/meminfo field ("MemAvailable", "MemTotal"), or None where it is missing."""
    for line in (text or "").splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def device_memory(ops=None, info: dict | None = None, meminfo: str | None = None) -> DeviceMemory:
    """What this machine's device can use. info: Metal's device_info (default: asked when ops is on a GPU);
    meminfo: the text of /proc/meminfo (default: read)."""
    on_gpu = bool(ops is not None and ops.on_gpu)
    if info is None and on_gpu:
        info = metal_info()
    if info and "max_recommended_working_set_size" in info:
        return DeviceMemory(int(info["max_recommended_working_set_size"]), "the Metal recommended working set",
                            metal=True, total=info.get("memory_size"))
    if on_gpu:
        total = _cuda_memory()
        if total:
            return DeviceMemory(total, "the GPU's memory", total=total)
    if meminfo is None and sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                meminfo = f.read()
        except OSError:
            meminfo = None
    avail = parse_meminfo(meminfo) if meminfo else None
    if avail is not None:
        return DeviceMemory(avail, "MemAvailable")
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return DeviceMemory(None, "unknown")
    return DeviceMemory(int(total * 0.75), "3/4 of physical memory", total=int(total))


def _cuda_memory() -> int | None:
    try:
        import mlx.core as mx

        info = mx.device_info()
    except Exception:  # noqa: BLE001
        logger.debug("no device info from MLX", exc_info=True)
        return None
    for key in ("total_memory", "memory_size"):
        if isinstance(info.get(key), int) and info[key] > 0:
            return int(info[key])
    return None


def gpu_share(memory_bytes: float) -> float:
    """The share of unified memory macOS lets the GPU wire by default (recommendedMaxWorkingSetSize): about two
    thirds up to 36 GB, three quarters above (an approximation; `mlxllama fit` on the Mac reads the real one)."""
    return memory_bytes * (2 / 3 if memory_bytes <= 36 * 2**30 else 3 / 4)


def chip_memories(chip, sizes_gb) -> list[DeviceMemory]:
    """One DeviceMemory per memory size (GB) the chip is sold with (bench.chips.memory_sizes_gb), smallest first."""
    out = []
    for gb in sizes_gb:
        total = gb * 2**30
        if chip.vendor == "Apple":
            out.append(DeviceMemory(int(gpu_share(total)), f"{chip.family} {gb} GB, ~{gpu_share(total) / GB:.1f} "
                                                           f"GB of it for the GPU", metal=True, total=total))
        else:
            out.append(DeviceMemory(int(total), f"{chip.name} ({gb} GB)", total=total))
    return out


# -- the verdict ----------------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def need_text(need: MemoryNeed) -> str:
    return (f"weights {_gb(need.weights)} + KV {_gb(need.kv)} (ctx {need.ctx} x batch {need.batch}, "
            f"{need.kv_label}) + activations {_gb(need.activations)} = {_gb(need.total)}")


def fits(need: MemoryNeed, dev: DeviceMemory) -> bool:
    return dev.usable is None or need.total <= dev.usable


def max_ctx(need: MemoryNeed, dev: DeviceMemory, args) -> int:
    """The longest context that fits, keeping the weights, the batch and the KV format (0 if none does)."""
    lo, hi = 0, need.ctx
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(memory_need(args, need.weights, mid, need.batch, need.float_bytes, need.settings), dev):
            lo = mid
        else:
            hi = mid - 1
    return lo // 256 * 256 if lo >= 256 else lo


def fit_line(need: MemoryNeed, dev: DeviceMemory, args=None) -> str:
    """One line: the numbers, the verdict, and where it does not fit, the ways out."""
    usable = f"{_gb(dev.usable)} usable ({dev.what})" if dev.usable is not None else "usable memory unknown"
    head = f"memory: {need_text(need)} of {usable}"
    if fits(need, dev):
        return head + ": fits"
    ways = []
    if args is not None and need.weights < dev.usable:
        from dataclasses import replace

        ctx = max_ctx(need, dev, args)
        if ctx > 0:
            ways.append(f"--ctx {ctx}")
        if need.settings is not None and need.settings.kv_bits is None and need.settings.max_kv_size is None:
            for bits in (8, 4):
                q = memory_need(args, need.weights, need.ctx, need.batch, need.float_bytes,
                                replace(need.settings, kv_bits=bits))
                if fits(q, dev):
                    ways.append(f"--kv-bits {bits}")
                    break
    if need.weights >= 0.7 * (dev.usable or 0):
        ways.append("a smaller quantization (the weights alone are "
                    f"{100 * need.weights / dev.usable:.0f}% of it)")
    if dev.metal and dev.total and need.total < 0.9 * dev.total:
        mb = math.ceil(need.total * 1.1 / _MiB)
        ways.append(f"raise the GPU limit: sudo sysctl iogpu.wired_limit_mb={mb}")
    return head + ": does not fit; try " + (", or ".join(ways) if ways else "a smaller model")


def ensure_fits(need: MemoryNeed, dev: DeviceMemory, args=None) -> None:
    """Raise DoesNotFit with fit_line's line where the need exceeds the usable memory."""
    if not fits(need, dev):
        raise DoesNotFit(fit_line(need, dev, args))


def backend_need(args, weights_bytes: int, ctx: int, batch: int, ops, settings=None) -> MemoryNeed:
    """memory_need for the KV cache `ops` keeps for `settings` (cache.for_backend) and its float size."""
    from .cache import for_backend

    return memory_need(args, weights_bytes, ctx, batch, ops.float_bytes, for_backend(settings, ops))


def check_model(model, ctx: int, batch: int = 1, settings=None, dev: DeviceMemory | None = None) -> MemoryNeed:
    """The fit check for a loaded model (generation, a server's slots): KV at ctx x batch + activations on top of
    the weights it holds. Raises DoesNotFit before the cache is allocated. For the serve engine: call it with the
    slot count and the context each slot may reach."""
    ops = model.ops
    need = backend_need(model.args, model.resident_nbytes, ctx, batch, ops, settings)
    ensure_fits(need, dev or device_memory(ops), model.args)
    return need


# -- the Metal wired limit ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WiredPlan:
    limit: int | None  # bytes to wire; None: leave the limit alone (not Metal)
    warning: str | None  # the model alone is larger than the recommended working set


def plan_wired(weights: int, kv: int, info: dict | None) -> WiredPlan:
    """Wire what the model needs (weights + KV at the requested context), never more than the recommended working
    set and never the whole of it by default (mlx-lm wires the whole set; on a 16 GB Mac that pushes the rest of
    the system into swap: exo #1672)."""
    if not info or "max_recommended_working_set_size" not in info:
        return WiredPlan(None, None)
    rec = int(info["max_recommended_working_set_size"])
    warning = None
    if weights > rec:
        warning = (f"the model's weights ({_gb(weights)}) exceed this GPU's recommended working set ({_gb(rec)}): "
                   "generation will be slow; use a smaller quantization, or raise the limit with "
                   f"sudo sysctl iogpu.wired_limit_mb={math.ceil(weights * 1.2 / _MiB)}")
    return WiredPlan(min(weights + kv, rec), warning)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def wired_limit(model, kv: int, info: dict | None = None, set_limit=None, synchronize=None):
    """While generating on Metal, wire the weights and the KV cache (mx.set_wired_limit), then restore the old limit.
    Elsewhere, nothing. info, set_limit, synchronize: injectable stand-ins for mx.device_info, mx.set_wired_limit,
    mx.synchronize."""
    if info is None and set_limit is None:
        info = metal_info() if model.ops.on_gpu else None
    plan = plan_wired(model.resident_nbytes, kv, info)
    if plan.warning:
        warn_once(plan.warning)
    if plan.limit is None:
        yield plan
        return
    if set_limit is None:
        import mlx.core as mx

        set_limit, synchronize = mx.set_wired_limit, mx.synchronize
    old = set_limit(plan.limit)
    try:
        yield plan
    finally:
        if synchronize is not None:
            synchronize()  # no evaluation may still be running when the limit changes
        set_limit(old)

