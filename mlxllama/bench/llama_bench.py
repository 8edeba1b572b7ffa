"""llama-bench results (`llama-bench -o json`: one array; `-o jsonl`: one object per line) as submissions.

Each llama-bench row is one test (n_prompt, n_gen, n_depth, samples_ts); rows that share every setting (model file,
backend, build, threads, batch sizes, KV types, ...) become one submission. The chip comes from gpu_info/cpu_info
(or --chip). Bytes and FLOPs per token come from the model file itself, which llama.cpp users have at hand: its
tensors give mlxllama's exact accounting (KV cache shape, matmul weights), rescaled to llama-bench's model_size,
the bytes llama.cpp actually stores. The file must have the parameter count llama-bench reported. The file's
location is not kept: the submission names the model by its file name only. Without the file (someone else's
results), the accounting comes from llama-bench's model_size and model_n_params alone: every weight read once per
token, the KV cache and attention not counted, and the submission's source says so.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from ..errors import UsageError
from . import chips, roofline, submissions

SETTINGS = ("n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "flash_attn", "split_mode")
_TEST_KEYS = {"n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
              "samples_ns", "samples_ts"}
KV_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


def parse(text: str, where: str = "llama-bench output") -> list[dict]:
    """The rows of `-o json` or `-o jsonl` output."""
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
    except ValueError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise UsageError(f"{where}: neither llama-bench -o json nor -o jsonl output ({e})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UsageError(f"{where}: row {i + 1} is not an object")
        missing = [k for k in ("model_filename", "model_size", "model_n_params", "backends", "build_commit",
                               "n_prompt", "n_gen", "samples_ts") if k not in row]
        if missing:
            raise UsageError(f"{where}: row {i + 1} lacks {', '.join(missing)}: not llama-bench output")
    if not rows:
        raise UsageError(f"{where}: no results")
    return rows


def _group_key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in _TEST_KEYS}, sort_keys=True, default=str)


def _model_file(row: dict, model: Path | None, where: str) -> Path | None:
    """The GGUF llama-bench ran: --model, else its model_filename where that is here; None when it is not."""
    if model is not None:
        return model
    path = Path(str(row["model_filename"]))
    for candidate in (path, Path(where).parent / path.name):
        if candidate.is_file():
            return candidate
    return None


ESTIMATED = "accounting from llama-bench's model_size and model_n_params (no model file: KV cache and attention " \
            "not counted)"


def _estimated_accounting(row: dict) -> tuple[roofline.Accounting, str]:
    size, params = int(row["model_size"]), int(row["model_n_params"])
    acc = roofline.Accounting(params=params, matmul_params=params, weight_bytes=size, weight_bytes_per_token=size,
                              kv_bytes_per_position=1, attn_flops_per_position=1)
    return acc, str(row.get("model_type") or "unknown").split()[-1]


def _accounting(path: Path, row: dict, where: str) -> tuple[roofline.Accounting, str]:
    from ..api import load_weights

    args, weights = load_weights(path)[:2]
    acc = roofline.account_weights(args, weights, kv_bytes=2)
    if acc.params != int(row["model_n_params"]):
        raise UsageError(f"{where}: {path.name} has {acc.params} parameters but llama-bench ran a model with "
                         f"{row['model_n_params']}: pass --model with the file llama-bench ran")
    size = int(row["model_size"])
    kv_scale = (KV_BYTES.get(str(row.get("type_k")), 2) + KV_BYTES.get(str(row.get("type_v")), 2)) / (2 + 2)
    acc = roofline.Accounting(
        params=acc.params, matmul_params=acc.matmul_params, weight_bytes=size,
        weight_bytes_per_token=size + acc.weight_bytes_per_token - acc.weight_bytes,
        kv_bytes_per_position=max(1, round(acc.kv_bytes_per_position * kv_scale)),
        attn_flops_per_position=acc.attn_flops_per_position)
    quant = str(row.get("model_type", "")).split()[-1] if row.get("model_type") else roofline.quant_label(weights)
    return acc, quant


def convert(rows: list[dict], *, model: str | Path | None = None, chip: str | None = None,
            where: str = "llama-bench output") -> list[dict]:
    """One submission per group of rows that share every setting."""
    the_chip = chips.lookup(chip) if chip else None
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    model = Path(model) if model is not None else None
    accounted: dict[Path, tuple] = {}
    subs = []
    for members in groups.values():
        first = members[0]
        path = _model_file(first, model, where)
        if path is None:
            acc, quant = _estimated_accounting(first)
            sha, model_id = None, Path(str(first["model_filename"])).name
        else:
            if path not in accounted:
                accounted[path] = (*_accounting(path, first, where), submissions.model_sha256(path))
            (acc, quant, sha), model_id = accounted[path], path.name
        tests, seen = [], set()
        for row in members:
            n_prompt, n_gen, n_depth = int(row["n_prompt"]), int(row["n_gen"]), int(row.get("n_depth") or 0)
            samples = [float(s) for s in row["samples_ts"]]
            name = submissions.format_test_name(n_prompt, n_gen, 1, n_depth)
            if name in seen or not samples:
                continue
            seen.add(name)
            tests.append(submissions.make_test(n_prompt, n_gen, 1, samples, acc, n_depth=n_depth))
        found = the_chip or chips.find(str(first.get("gpu_info") or "")) or chips.find(str(first.get("cpu_info") or ""))
        gpus = [{"name": g.strip(), "memory_mb": None} for g in str(first.get("gpu_info") or "").split(",")
                if g.strip()]
        backend = str(first["backends"])
        on_gpu = backend.upper() not in ("CPU", "BLAS") and first.get("n_gpu_layers", 1) != 0
        dates = sorted(str(r["test_time"]) for r in members if r.get("test_time"))
        subs.append({
            "schema_version": submissions.SCHEMA_VERSION,
            "date": dates[0] if dates else _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "source": f"llama-bench, llama.cpp build {first['build_commit']} ({first.get('build_number', '?')})"
                      + (f"; {ESTIMATED}" if path is None else ""),
            "machine": {"system": None, "os": "unknown (llama-bench import)", "cpu": first.get("cpu_info") or None,
                        "cpu_cores": None, "memory_bytes": None, "model": None,
                        "gpu_cores": found.gpu_cores if found else None, "gpus": gpus},
            "chip": submissions.chip_block(found),
            "measured_bandwidth": None,
            "versions": {"mlxllama": submissions.versions()["mlxllama"], "mlx": None, "numpy": None, "python": None,
                         "llama.cpp": str(first["build_commit"])},  # the importer's version, the run's build
            "model": {"id": model_id, "sha256": sha, "quant": quant, "accounting": acc.to_dict()},
            "backend": f"llama.cpp {backend}",
            "device": "gpu" if on_gpu else "cpu",
            "settings": {k: first[k] for k in SETTINGS if k in first},
            "tests": tests,
        })
    return subs


def import_file(path: str | Path, out_dir: str | Path, *, model: str | Path | None = None,
                chip: str | None = None) -> list[Path]:
    """Convert one llama-bench output file; validate everything before writing anything."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    subs = convert(parse(text, str(path)), model=model, chip=chip, where=str(path))
    for sub in subs:
        reasons = submissions.validate(sub)
        if reasons:
            raise UsageError(f"{path}: the converted submission is invalid: {reasons[0]}")
    return [submissions.write(sub, out_dir) for sub in subs]
