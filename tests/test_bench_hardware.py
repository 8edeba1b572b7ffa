import os

import pytest

from mlxllama.bench import hardware, probe
from mlxllama.bench.chips import lookup
from mlxllama.bench.hardware import Gpu, Machine

SYSTEM_PROFILER = """Graphics/Displays:

    Apple M2 Max:

      Chipset Model: Apple M2 Max
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 38
      Vendor: Apple (0x106b)
      Metal Support: Metal 3
"""

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme
"""


def test_parsers():
    assert hardware.parse_gpu_cores(SYSTEM_PROFILER) == 38
    assert hardware.parse_gpu_cores('  |   "gpu-core-count" = 76\n') == 76
    assert hardware.parse_gpu_cores("no gpu here") is None and hardware.parse_gpu_cores(None) is None
    assert hardware.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\nNVIDIA A100-SXM4-40GB, 40960\n\n") == [
        Gpu("NVIDIA H100 80GB HBM3", 81559), Gpu("NVIDIA A100-SXM4-40GB", 40960)]
    assert hardware.parse_nvidia_smi("NVIDIA H200, [N/A]") == [Gpu("NVIDIA H200", None)]
    assert hardware.parse_nvidia_smi(None) == []
    assert hardware.parse_cpuinfo(CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"
    assert hardware.parse_cpuinfo("Hardware\t: BCM2835\n") == "BCM2835"
    assert hardware.parse_meminfo("MemTotal:       16315060 kB\nMemFree: 1 kB\n") == 16315060 * 1024


def test_apple_chip_matching():
    assert hardware.apple_chip("Apple M2 Max", 30) == lookup("M2 Max 30")
    assert hardware.apple_chip("Apple M2 Max", None) == lookup("M2 Max 38")
    assert hardware.apple_chip("Apple M2 Max", 34) == lookup("M2 Max 38")  # unlisted count: family top
    assert hardware.apple_chip("Intel(R) Core(TM) i9", 0) is None
    assert hardware.apple_chip(None, None) is None


def test_chip_for_device():
    mac = Machine("Darwin", "macOS 14", "Apple M2", 8, 1 << 34, gpu_cores=10, chip=lookup("M2 10"))
    assert hardware.chip_for_device(mac, "cpu") == mac.chip  # unified memory
    linux = Machine("Linux", "Linux", "Xeon", 16, 1 << 37, gpus=[Gpu("NVIDIA H100 PCIe", 81559)],
                    chip=lookup("NVIDIA H100 PCIe"))
    assert hardware.chip_for_device(linux, "Device(gpu, 0)") == linux.chip
    assert hardware.chip_for_device(linux, "cpu") is None
    assert linux.rated_bandwidth_gbps == 2000
    assert linux.to_dict()["gpus"] == [{"name": "NVIDIA H100 PCIe", "memory_mb": 81559}]
    assert "NVIDIA H100 PCIe (81559 MiB)" in linux.describe()


def test_detect_runs_here():
    m = hardware.detect()
    assert m.system and m.os
    assert m.cpu_cores is None or m.cpu_cores > 0
    d = m.to_dict()
    assert set(d) == {"system", "os", "cpu", "cpu_cores", "memory_bytes", "model", "gpu_cores", "gpus"}


def test_probe_numpy_small():
    p = probe.probe("numpy", nbytes=4 << 20, runs=3, max_seconds=0.5)
    assert p.backend == "numpy" and p.device == "cpu" and p.nbytes == 4 << 20
    assert p.copy_gbps > 0.1 and p.read_gbps > 0.1 and 1 <= p.runs <= 3


def test_probe_mlx_small():
    pytest.importorskip("mlx.core", reason="mlx not installed")
    p = probe.probe_mlx(nbytes=4 << 20, runs=2, max_seconds=0.5)
    assert p.backend == "mlx" and p.device.startswith("Device(")
    assert p.copy_gbps > 0 and p.read_gbps > 0


def test_probe_outgrows_the_last_level_cache_and_uses_every_core():
    # MLX on a CPU is probed with numpy on all cores: MLX's CPU reductions are compute-bound and would read low
    p = probe.probe("mlx", nbytes=4 << 20, runs=2, max_seconds=0.5, on_gpu=False)
    assert p.backend == "numpy" and p.threads == (os.cpu_count() or 1)
    llc = probe.llc_bytes()
    assert probe.cpu_buffer_bytes(llc) >= max(256 << 20, 4 * (llc or 0)) or probe.cpu_buffer_bytes(llc) == 1 << 30
    assert probe.cpu_buffer_bytes(64 << 20) == 256 << 20 and probe.cpu_buffer_bytes(128 << 20) == 512 << 20


def test_chip_comes_from_the_detected_machine():
    m2max = lookup("M2 Max")
    detected = Machine(system="Darwin", os="macOS 14.5", cpu="Apple M2 Max", cpu_cores=12, memory_bytes=None,
                       gpu_cores=38, chip=m2max)
    assert hardware.chip_for_claim(detected, lookup("M2 Max 30")) == m2max  # the detected core count wins
    uncounted = Machine(system="Darwin", os="macOS 14.5", cpu="Apple M2 Max", cpu_cores=12, memory_bytes=None,
                        chip=m2max)
    assert hardware.chip_for_claim(uncounted, lookup("M2 Max 30")) == lookup("M2 Max 30")  # cores unknown here
    assert hardware.chip_for_claim(detected, None) is None
    x86 = Machine(system="Linux", os="Linux 6.8", cpu="AMD EPYC", cpu_cores=2, memory_bytes=None)
    assert hardware.chip_contradiction(x86.to_dict(), "M2") is not None
    assert hardware.chip_contradiction(detected.to_dict(), "M2 Max 30") is None
