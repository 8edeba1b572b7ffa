"""Published reference figures as submissions: llama.cpp's Apple Silicon table (discussion #4167, build 8e672ef).

The CSV (benchmarks/reference/llamacpp-4167-apple-silicon.csv) holds one row per chip and GPU-core count with
pp512/tg128 t/s for LLaMA-2 7B at F16, Q8_0 and Q4_0. Each non-empty (row, quant) becomes one submission.
Bytes per token follow llama.cpp's storage of those files: F16 everywhere; Q8_0 blocks of 32 (34 bytes); Q4_0 blocks
of 32 (18 bytes) with the output head in Q6_K (210 bytes per 256), as llama.cpp's quantizer does; norms F32.
This reproduces the file sizes in the CSV header (12.55, 6.67 and 3.56 GiB).

    python -m mlxllama.bench.reference CSV OUT_DIR...    regenerates the JSON files in each OUT_DIR
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from .chips import find
from .roofline import LLAMA2_7B, Accounting, account_shape
from .submissions import SCHEMA_VERSION, dumps, make_test, validate

SOURCE = "llama.cpp discussion #4167, build 8e672ef"
BUILD_DATE = "2023-11-21"
MODEL_ID = "LLaMA-2 7B"
# quant -> (bytes per weight of the linears and the embedding table, of the output head)
QUANTS = {"F16": (2.0, 2.0), "Q8_0": (34 / 32, 34 / 32), "Q4_0": (18 / 32, 210 / 256)}


def package_dir() -> Path:
    """The bundled copy (package data) of the reference submissions."""
    return Path(__file__).parent / "data" / "reference"


def accounting(quant: str) -> Accounting:
    linear, head = QUANTS[quant]
    return account_shape(LLAMA2_7B, linear, head_bytes_per_weight=head, norm_bytes=4, kv_bytes=2)


def _number(text: str) -> float | None:
    text = text.strip()
    return float(text) if text else None


def convert(csv_text: str) -> dict[str, dict]:
    """File name -> submission, for every (chip row, quant) with figures."""
    lines = [line for line in csv_text.splitlines() if line.strip() and not line.startswith("#")]
    out = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        cores = int(row["gpu_cores"])
        chip = find(row["chip"], cores)
        for quant in QUANTS:
            pp, tg = _number(row[f"{quant.lower()}_pp512"]), _number(row[f"{quant.lower()}_tg128"])
            if pp is None and tg is None:
                continue
            acc = accounting(quant)
            tests = []
            if pp is not None:
                tests.append(make_test(512, 0, 1, [pp], acc))
            if tg is not None:
                tests.append(make_test(0, 128, 1, [tg], acc))
            sub = {
                "schema_version": SCHEMA_VERSION,
                "date": BUILD_DATE,
                "source": SOURCE,
                "machine": {"system": "Darwin", "os": "macOS", "cpu": f"Apple {row['chip']}", "cpu_cores": None,
                            "memory_bytes": None, "model": None, "gpu_cores": cores, "gpus": []},
                "chip": {"name": chip.name if chip else f"{row['chip']} ({cores}-core GPU)", "gpu_cores": cores,
                         "rated_bandwidth_gbps": float(row["bw_gbps"]),
                         "peak_fp16_tflops": chip.fp16_tflops if chip else None},
                "measured_bandwidth": None,
                "versions": {"mlxllama": None, "mlx": None, "numpy": None, "python": None, "llama.cpp": "8e672ef"},
                "model": {"id": MODEL_ID, "sha256": None, "quant": quant, "accounting": acc.to_dict()},
                "backend": "llama.cpp Metal",
                "device": "gpu",
                "tests": tests,
            }
            name = f"llamacpp-4167_{row['chip'].replace(' ', '-')}-{cores}c_llama2-7b_{quant}.json"
            out[name] = sub
    return out


def write_all(csv_path: str | Path, out_dirs: list[str | Path]) -> int:
    subs = convert(Path(csv_path).read_text())
    for name, sub in subs.items():
        reasons = validate(sub)
        if reasons:
            raise ValueError(f"{name}: {reasons[0]}")
    for d in out_dirs:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("llamacpp-4167_*.json"):
            old.unlink()
        for name, sub in subs.items():
            (d / name).write_text(dumps(sub))
    return len(subs)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m mlxllama.bench.reference CSV OUT_DIR...")
    print(write_all(sys.argv[1], sys.argv[2:]), "submissions written")
