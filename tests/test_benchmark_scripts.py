"""The scripts in benchmarks/ stand on their own: compare.py's summary, the llama.cpp peer installer's flags."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ran(tps: float) -> dict:
    return {"pp_tps": tps * 10, "pp_best_tps": tps * 11, "tg_tps": tps, "tg_best_tps": tps * 1.1, "ttft_s": 1 / tps,
            "ttft_cold_s": 2 / tps, "load_s": 1.0, "rss_base": 100e6, "rss_load_peak": 400e6,
            "weights_bytes": 100e6, "kv_bytes": 10e6, "detail": "test"}


def test_compare_prints_ratios_only_when_a_peer_ran():
    compare = load("compare")
    spec = {"pp": 512, "tg": 128}
    skipped = {"numpy": ran(40.0), "mlx-lm": {"skipped": "skipped: mlx-lm is not installed"},
               "llama.cpp": {"skipped": "skipped: llama-cpp-python is not installed"}}
    assert "Ratios" not in compare.table(skipped, spec)
    both = {"numpy": ran(40.0), "llama.cpp": ran(80.0)}
    text = compare.table(both, spec)
    assert "Ratios of medians" in text and "mlxllama numpy float32 vs llama.cpp: pp512 0.50x" in text


def test_compare_points_at_the_installer_in_the_repository():
    compare = load("compare")
    why = compare.available("llama.cpp", {"gguf": "x.gguf"})
    if why is not None:
        assert "benchmarks/install_llamacpp.sh" in why
    assert (ROOT / "benchmarks" / "install_llamacpp.sh").is_file()


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="x86 Linux flags")
def test_installer_picks_simd_flags_from_cpuinfo():
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "install_llamacpp.sh"), "--print-flags"],
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    listed = set(cpu.split(":", 1)[1].split())
    flags = dict(f.removeprefix("-D").split("=") for f in out)
    assert flags["GGML_NATIVE"] == "OFF"
    for option, cpu_flag in (("GGML_AVX", "avx"), ("GGML_AVX2", "avx2"), ("GGML_FMA", "fma"), ("GGML_F16C", "f16c"),
                             ("GGML_AVX512", "avx512f"), ("GGML_AVX512_VNNI", "avx512_vnni"),
                             ("GGML_AVX_VNNI", "avx_vnni")):
        assert flags[option] == ("ON" if cpu_flag in listed else "OFF"), option
    assert flags["GGML_AMX_TILE"] == flags["GGML_AMX_INT8"] == flags["GGML_AMX_BF16"] == "OFF"


def test_kernels_prints_each_paths_instruction_ceiling(capsys):
    """benchmarks/kernels.py ends its table with each path's multiply-add run alone, on every path this CPU has
    (the generic one included), and the kernel's cells on the instruction paths stay under their ceiling (the
    generic path's plain IR is lowered by LLVM differently in the kernel and alone)."""
    pytest.importorskip("numba")
    from mlxllama.backends import qmatvec

    kernels = load("kernels")
    isas = qmatvec.available_isas()
    assert kernels.main(["--isa", ",".join(isas), "--rows", "8", "--reps", "1", "--no-blas"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("| 8 |"))
    top = next(line for line in lines if line.startswith("| ceiling"))
    rates = [float(cell.split(",")[1]) for cell in row.strip("|").split("|")[1:]]
    peaks = [float(cell) for cell in top.strip("|").split("|")[1:]]
    assert len(peaks) == len(rates) == 2 * len(isas)
    assert all(rate > 0 and peak > 0 for rate, peak in zip(rates, peaks))
    paths = [isa for isa in isas for _ in (16, 8)]
    assert all(rate < peak * 1.05 for rate, peak, isa in zip(rates, peaks, paths) if isa != "generic")
