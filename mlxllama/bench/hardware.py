"""Detect the machine: OS, CPU, memory, GPUs, and the matching row of the chip table.

macOS: sysctl (machdep.cpu.brand_string, hw.memsize, hw.model), GPU cores from `system_profiler
SPDisplaysDataType` (or ioreg's gpu-core-count). Linux: /proc/cpuinfo, /proc/meminfo, and NVIDIA GPUs from
`nvidia-smi --query-gpu=name,memory.total`. Every probe is optional: a missing tool leaves its field None.
The --chip and --bandwidth overrides are the caller's business.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field

from .. import memory
from .chips import Chip, find


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int | None = None


@dataclass
class Machine:
    system: str                    # platform.system(): "Darwin", "Linux", ...
    os: str                        # "macOS 14.1", "Linux 6.8.0-...", ...
    cpu: str | None
    cpu_cores: int | None
    memory_bytes: int | None
    model: str | None = None       # Mac model identifier (hw.model), e.g. "Mac14,14"
    gpu_cores: int | None = None   # Apple GPU cores
    gpus: list[Gpu] = field(default_factory=list)  # discrete GPUs (NVIDIA)
    chip: Chip | None = None       # the accelerator in the chip table: the Apple chip, or the first known GPU

    @property
    def rated_bandwidth_gbps(self) -> float | None:
        return self.chip.bandwidth_gbps if self.chip else None

    def to_dict(self) -> dict:
        """The submission's "machine" block (no host name, no serial numbers)."""
        return {"system": self.system, "os": self.os, "cpu": self.cpu, "cpu_cores": self.cpu_cores,
                "memory_bytes": self.memory_bytes, "model": self.model, "gpu_cores": self.gpu_cores,
                "gpus": [asdict(g) for g in self.gpus]}

    def describe(self) -> str:
        mem = f", {self.memory_bytes / 2**30:.0f} GiB" if self.memory_bytes else ""
        parts = [f"{self.os}, {self.cpu or 'unknown CPU'} ({self.cpu_cores or '?'} cores{mem})"]
        if self.gpu_cores:
            parts.append(f"{self.gpu_cores}-core GPU")
        parts += [f"{g.name}" + (f" ({g.memory_mb} MiB)" if g.memory_mb else "") for g in self.gpus]
        return ", ".join(parts)


def chip_for_device(machine: Machine, device: str) -> Chip | None:
    """The chip whose rated bandwidth applies to a run on `device` ("gpu"/"cpu"/MLX's device string).

    Apple silicon has one unified memory, rated the same for CPU and GPU; elsewhere a CPU run gets no chip.
    """
    if machine.chip is None:
        return None
    if machine.chip.vendor == "Apple" or "gpu" in device.lower() or "cuda" in device.lower():
        return machine.chip
    return None


def chip_contradiction(machine: dict, chip_name: str | None) -> str | None:
    """Why a chip claimed for a run cannot be the machine's (submission dicts), or None when it can be or when
    there is nothing to compare: an Apple chip needs a Mac of that family, an NVIDIA one a detected GPU of it."""
    chip = find(chip_name) if chip_name else None
    if chip is None or not machine:
        return None
    system, cpu = machine.get("system"), machine.get("cpu") or ""
    gpus = [g.get("name") or "" for g in machine.get("gpus") or [] if isinstance(g, dict)]
    where = ", ".join(x for x in (cpu, machine.get("os") or system) if x) or "an unknown machine"
    if chip.vendor == "Apple":
        if (system and system != "Darwin") or (cpu and not cpu.lower().startswith("apple")):
            return f"{chip.name} is not this machine's chip ({where})"
        detected = find(cpu) if cpu else None
        if detected is not None and detected.family != chip.family:
            return f"{chip.name} is not this machine's chip ({detected.family}: {where})"
        return None
    if not any((g := find(name)) is not None and g.family == chip.family for name in gpus):
        found = ", ".join(gpus) or "none detected"
        return f"{chip.name} is not among this machine's chips ({where}; GPUs: {found})"
    return None


def chip_for_claim(machine: Machine, claimed: Chip | None) -> Chip | None:
    """The chip a run is scored against: the detected one where there is one (a claimed variant of the same
    family is kept only where detection could not count the GPU cores), else the claim."""
    if claimed is None or machine.chip is None:
        return claimed
    if claimed.family == machine.chip.family and machine.gpu_cores is None and claimed.vendor == "Apple":
        return claimed
    return machine.chip


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def parse_gpu_cores(text: str | None) -> int | None:
    """GPU core count from `system_profiler SPDisplaysDataType` ("Total Number of Cores: 38") or from
    `ioreg` ("gpu-core-count" = 38)."""
    if not text:
        return None
    m = re.search(r"Total Number of Cores:\s*(\d+)", text) or re.search(r'"gpu-core-count"\s*=\s*(\d+)', text)
    return int(m.group(1)) if m else None


def parse_nvidia_smi(text: str | None) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        name, _, mem = line.rpartition(",")
        if not name:
            name, mem = mem, ""
        mem = mem.strip()
        gpus.append(Gpu(name.strip(), int(float(mem)) if re.fullmatch(r"\d+(\.\d+)?", mem) else None))
    return gpus


def parse_cpuinfo(text: str | None) -> str | None:
    """CPU model from /proc/cpuinfo: x86 "model name", else ARM "Hardware"/"Model"/"cpu model"."""
    for key in ("model name", "Hardware", "cpu model", "Model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text or "", re.MULTILINE)
        if m:
            return m.group(1).strip()
    return None


def parse_meminfo(text: str | None) -> int | None:
    """The machine's total memory in bytes."""
    return memory.parse_meminfo(text, "MemTotal")


def apple_chip(brand: str | None, gpu_cores: int | None) -> Chip | None:
    """The table row for 'Apple M2 Max' with 38 GPU cores; an unlisted core count falls back to the family's
    top configuration (same memory system, so the same rated bandwidth in every family except M3/M4 Max)."""
    if not brand:
        return None
    return (find(brand, gpu_cores) if gpu_cores else None) or find(brand)


def _detect_mac() -> Machine:
    brand = (_run(["sysctl", "-n", "machdep.cpu.brand_string"]) or "").strip() or None
    mem = (_run(["sysctl", "-n", "hw.memsize"]) or "").strip()
    model = (_run(["sysctl", "-n", "hw.model"]) or "").strip() or None
    cores = parse_gpu_cores(_run(["system_profiler", "SPDisplaysDataType"], timeout=20))
    if cores is None:
        cores = parse_gpu_cores(_run(["ioreg", "-rc", "AGXAccelerator", "-d", "1"]))
    return Machine(system="Darwin", os=f"macOS {platform.mac_ver()[0]}", cpu=brand, cpu_cores=os.cpu_count(),
                   memory_bytes=int(mem) if mem.isdigit() else None, model=model, gpu_cores=cores,
                   chip=apple_chip(brand, cores))


def _detect_linux() -> Machine:
    gpus = parse_nvidia_smi(_run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]))
    chip = next((c for c in (find(g.name) for g in gpus) if c is not None), None)
    return Machine(system="Linux", os=f"Linux {platform.release()}",
                   cpu=parse_cpuinfo(_read("/proc/cpuinfo")) or platform.processor() or None,
                   cpu_cores=os.cpu_count(), memory_bytes=parse_meminfo(_read("/proc/meminfo")), gpus=gpus, chip=chip)


def detect() -> Machine:
    system = platform.system()
    if system == "Darwin":
        return _detect_mac()
    if system == "Linux":
        return _detect_linux()
    return Machine(system=system, os=f"{system} {platform.release()}", cpu=platform.processor() or None,
                   cpu_cores=os.cpu_count(), memory_bytes=None)
