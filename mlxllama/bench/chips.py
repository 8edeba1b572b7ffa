"""Chip table: rated memory bandwidth, GPU cores and peak TFLOPS, each row with its source (data/chips.json).

Covers every Apple M1-M4 variant and GPU-core option (there is no M4 Ultra; the M3 Ultra is the newest Ultra)
and a few NVIDIA reference GPUs. Bandwidth is in GB/s (1e9 bytes/s), as vendors rate it.

lookup() is forgiving about case, spacing, punctuation and an "Apple"/"NVIDIA" prefix. A name that gives only the
family ("M2 Max", "A100") picks the family's top configuration: the most GPU cores, then the highest bandwidth,
then the highest fp16 peak. So "M3 Max" is the 40-core 400 GB/s part, and "A100" the 80GB SXM4 (2039 GB/s).
Name a core count to pick a variant: "M2 Max 30", "M2 Max 30-core", "Apple M2 Max (30-core GPU)",
or pass gpu_cores=30.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UsageError

DATA = Path(__file__).parent / "data" / "chips.json"
_IGNORED_WORDS = {"apple", "nvidia", "tesla", "gpu", "core", "cores", "chip"}


@dataclass(frozen=True)
class Chip:
    name: str
    family: str
    vendor: str
    gpu_cores: int  # Apple GPU cores, NVIDIA SMs
    bandwidth_gbps: float
    fp16_tflops: float | None
    fp32_tflops: float | None
    source: str
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Short name for plots and tables: 'M2 Max 38c', 'A100 SXM4 80GB'."""
        return f"{self.family} {self.gpu_cores}c" if self.vendor == "Apple" else self.name


@lru_cache(maxsize=1)
def all_chips() -> tuple[Chip, ...]:
    rows = json.loads(DATA.read_text())["chips"]
    return tuple(Chip(name=r["name"], family=r["family"], vendor=r["vendor"], gpu_cores=int(r["gpu_cores"]),
                      bandwidth_gbps=float(r["bandwidth_gbps"]), fp16_tflops=r.get("fp16_tflops"),
                      fp32_tflops=r.get("fp32_tflops"), source=r["source"], aliases=tuple(r.get("aliases", ())))
                 for r in rows)


def _key(name: str) -> str:
    words = re.findall(r"[a-z0-9]+", name.lower())
    return " ".join(w for w in words if w not in _IGNORED_WORDS)


def _top(rows: list[Chip]) -> Chip:
    return max(rows, key=lambda c: (c.gpu_cores, c.bandwidth_gbps, c.fp16_tflops or 0.0))


def find(name: str, gpu_cores: int | None = None) -> Chip | None:
    """The chip `name` refers to, or None. See the module docstring for the matching rules."""
    key = _key(name)
    if not key:
        return None
    chips = all_chips()
    exact = [c for c in chips if key in (_key(c.name), *(_key(a) for a in c.aliases))]
    if exact and (gpu_cores is None or exact[0].gpu_cores == gpu_cores):
        return exact[0]
    family, _, last = key.rpartition(" ")
    if last.isdigit() and family and gpu_cores is None:
        key, gpu_cores = family, int(last)
    in_family = [c for c in chips if _key(c.family) == key]
    if gpu_cores is not None:
        in_family = [c for c in in_family if c.gpu_cores == gpu_cores]
    return _top(in_family) if in_family else None


def lookup(name: str, gpu_cores: int | None = None) -> Chip:
    """Like find(), but an unknown name is a UsageError that lists the known families."""
    chip = find(name, gpu_cores)
    if chip is None:
        families = list(dict.fromkeys(c.family for c in all_chips()))
        cores = f" with {gpu_cores} GPU cores" if gpu_cores is not None else ""
        raise UsageError(f"unknown chip {name!r}{cores}; known: {', '.join(families)} "
                         f"(optionally with a GPU core count, e.g. 'M2 Max 30'), or pass --bandwidth")
    return chip


# Unified memory (Apple) sizes each family is sold with, in GB, from Apple's technical specifications pages; an NVIDIA
# row's memory is in its name ("A100 SXM4 80GB", "H200 SXM 141GB").
APPLE_MEMORY_GB = {
    "M1": (8, 16), "M1 Pro": (16, 32), "M1 Max": (32, 64), "M1 Ultra": (64, 128),
    "M2": (8, 16, 24), "M2 Pro": (16, 32), "M2 Max": (32, 64, 96), "M2 Ultra": (64, 128, 192),
    "M3": (8, 16, 24), "M3 Pro": (18, 36), "M3 Max": (36, 48, 64, 96, 128), "M3 Ultra": (96, 256, 512),
    "M4": (16, 24, 32), "M4 Pro": (24, 48, 64), "M4 Max": (36, 48, 64, 128),
}


def memory_sizes_gb(chip: Chip) -> tuple[int, ...]:
    """The memory sizes (GB) the chip comes with, smallest first; () where the table does not say."""
    if chip.vendor == "Apple":
        return APPLE_MEMORY_GB.get(chip.family, ())
    m = re.search(r"(\d+)\s*GB", chip.name)
    return (int(m.group(1)),) if m else ()
