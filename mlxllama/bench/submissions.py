"""Benchmark submissions: one JSON file per run, schema_version 1.

    {
      "schema_version": 1,
      "date": "2025-06-01T12:00:00Z",               ISO 8601 date or date-time
      "source": "measured",                         or a description of where published figures came from
      "machine": {"system": "Darwin", "os": "macOS 14.5", "cpu": "Apple M2 Max", "cpu_cores": 12,
                  "memory_bytes": 68719476736, "model": "Mac14,6", "gpu_cores": 38, "gpus": []},
      "chip": {"name": "M2 Max (38-core GPU)", "gpu_cores": 38, "rated_bandwidth_gbps": 400,
               "peak_fp16_tflops": 13.6},               every value may be null (unknown chip)
      "measured_bandwidth": {"backend": "mlx", "device": "gpu", "copy_gbps": 330.1, "read_gbps": 370.5} | null,
      "versions": {"mlxllama": "0.1.0", "mlx": "0.25.0", "numpy": "2.1.0", "python": "3.11.7"},
      "model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "sha256": "<64 hex>" | null, "quant": "Q4_1",
                "accounting": {Accounting fields: params, matmul_params, weight_bytes, weight_bytes_per_token,
                               kv_bytes_per_position, attn_flops_per_position}},
      "backend": "mlx", "device": "gpu",
      "cluster": {"nodes": 2, "link": "tb5", "parallel": "tensor"},   only for runs over mlx.launch ranks
      "tests": [{"name": "tg128@B8", "n_prompt": 0, "n_gen": 128, "batch": 8,
                 "samples_tps": [612.0, 609.5], "bytes_per_step": 9.1e7, "flops_per_token": 2.7e8}]
    }

Tests follow llama-bench's shapes: prompt processing ("pp512": n_gen 0, t/s = prompt tokens per second),
generation ("tg128": n_prompt 0, timed decode of n_gen tokens) and both timed as one ("pp512+tg128": t/s = (n_prompt
+ n_gen) / time). n_depth (optional, default 0) counts tokens already in the KV cache before the timed part ("@d512"
in the name); "@B8" marks a batch of 8 sequences, whose t/s counts the tokens of all of them. bytes_per_step is what
one forward step reads at the test's mean context (roofline.Accounting.bytes_per_step: the KV reads at the depth
included), flops_per_token the FLOPs per token there; for pp+tg, bytes_per_step is the bytes read per token over the
whole test (the prefill's weight read shared by its tokens, then one weight read per generated token).

A measured submission ("source": "measured") must carry the model file's sha256 and the mlxllama, numpy and
python versions. Physically implausible: a tg sample above batch * rated bandwidth / bytes_per_step by more than
10%. Without a rated bandwidth that check is skipped (measured figures, one CPU thread for numpy, can sit below
what a multi-threaded kernel reaches, and caches can serve a small model).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
from importlib import metadata
from pathlib import Path

from ..errors import UsageError
from .chips import Chip
from .hardware import Machine
from .probe import BandwidthProbe
from .roofline import Accounting, mean_context

SCHEMA_VERSION = 1
PLAUSIBILITY_MARGIN = 1.10
ACCOUNTING_FIELDS = ("params", "matmul_params", "weight_bytes", "weight_bytes_per_token", "kv_bytes_per_position",
                     "attn_flops_per_position")
_NAME_RE = re.compile(r"(?:pp\d+\+tg\d+|pp\d+|tg\d+)(?:@d\d+)?(?:@B\d+)?")


def format_test_name(n_prompt: int, n_gen: int, batch: int = 1, n_depth: int = 0) -> str:
    if n_prompt and n_gen:
        name = f"pp{n_prompt}+tg{n_gen}"
    else:
        name = f"tg{n_gen}" if n_gen else f"pp{n_prompt}"
    return name + (f"@d{n_depth}" if n_depth else "") + (f"@B{batch}" if batch > 1 else "")


def test_kind(t: dict) -> str:
    """"pp", "tg" or "pg" (a prompt then generation, timed as one)."""
    return "pg" if t["n_prompt"] and t["n_gen"] else ("tg" if t["n_gen"] else "pp")


def test_context(n_prompt: int, n_gen: int, n_depth: int = 0) -> float:
    """Mean positions attended per timed token: the depth plus the mean over the timed tokens."""
    return n_depth + (mean_context(n_prompt, 0) if not n_gen else mean_context(0, n_prompt + n_gen))


def make_test(n_prompt: int, n_gen: int, batch: int, samples_tps: list[float], acc: Accounting,
              n_depth: int = 0) -> dict:
    """One test record; bytes and FLOPs come from the accounting at the test's mean context, the KV cache's
    n_depth positions included."""
    ctx = test_context(n_prompt, n_gen, n_depth)
    if n_gen == 0:  # one pass over the weights, the KV cache (depth and prompt) read once
        step_bytes = acc.weight_bytes_per_token + batch * acc.kv_bytes(n_depth + n_prompt)
    elif n_prompt == 0:
        step_bytes = acc.bytes_per_step(ctx, batch)
    else:  # the prefill pass, then one step per generated token; per token of the whole test
        prefill = acc.weight_bytes_per_token + batch * acc.kv_bytes(n_depth + n_prompt)
        decode = n_gen * acc.bytes_per_step(n_depth + n_prompt + (n_gen + 1) / 2, batch)
        step_bytes = (prefill + decode) / (n_prompt + n_gen)
    test = {"name": format_test_name(n_prompt, n_gen, batch, n_depth), "n_prompt": n_prompt, "n_gen": n_gen}
    if n_depth:
        test["n_depth"] = n_depth
    return {**test, "batch": batch, "samples_tps": [float(s) for s in samples_tps],
            "bytes_per_step": float(step_bytes), "flops_per_token": float(acc.flops_per_token(ctx))}


def versions() -> dict:
    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    from .. import __version__

    return {"mlxllama": __version__, "mlx": version("mlx"), "numpy": version("numpy"),
            "python": platform.python_version()}


def chip_block(chip: Chip | None, rated_bandwidth_gbps: float | None = None) -> dict:
    """rated_bandwidth_gbps (the --bandwidth override) wins over the chip's rating."""
    return {"name": chip.name if chip else None, "gpu_cores": chip.gpu_cores if chip else None,
            "rated_bandwidth_gbps": rated_bandwidth_gbps or (chip.bandwidth_gbps if chip else None),
            "peak_fp16_tflops": chip.fp16_tflops if chip else None}


def make_submission(*, machine: Machine, chip: Chip | None, model_id: str, model_sha256: str | None, quant: str,
                    accounting: Accounting, backend: str, device: str, tests: list[dict],
                    rated_bandwidth_gbps: float | None = None, measured: BandwidthProbe | None = None,
                    source: str = "measured", date: str | None = None,
                    weight_file_bytes: int | None = None, cluster: dict | None = None) -> dict:
    """cluster: {"nodes", "link", "parallel"} for a run over mlx.launch ranks (absent for one process)."""
    return ({"cluster": cluster} if cluster else {}) | {
        "schema_version": SCHEMA_VERSION,
        "date": date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "machine": machine.to_dict(),
        "chip": chip_block(chip, rated_bandwidth_gbps),
        "measured_bandwidth": None if measured is None else {
            "backend": measured.backend, "device": measured.device,
            "copy_gbps": measured.copy_gbps, "read_gbps": measured.read_gbps, "nbytes": measured.nbytes,
            "threads": measured.threads, "llc_bytes": measured.llc_bytes, "load_average": measured.load_average},
        "versions": versions(),
        "model": {"id": model_id, "sha256": model_sha256, "quant": quant, "accounting": accounting.to_dict(),
                  **({"weight_file_bytes": int(weight_file_bytes)} if weight_file_bytes else {})},
        "backend": backend,
        "device": device,
        "tests": tests,
    }


def model_sha256(path: str | Path) -> str:
    """sha256 of a model file; for a folder, of the sorted '<name> <sha256>' lines of its weight/config files."""
    path = Path(path)

    def file_hash(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if path.is_file():
        return file_hash(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".json", ".model"))
    return hashlib.sha256("".join(f"{p.name} {file_hash(p)}\n" for p in files).encode()).hexdigest()


# --- validation ---

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _positive(v) -> bool:
    return _is_num(v) and v > 0


class _Checker:
    """Collects the reasons a submission is unacceptable: sections (objects) and their fields, checked."""

    def __init__(self, obj: dict):
        self.obj = obj
        self.reasons: list[str] = []

    def section(self, key: str, nullable: bool = False) -> dict:
        v = self.obj.get(key, ...)
        if v is ...:
            self.reasons.append(f"{key}: missing")
        elif v is None and nullable:
            return {}
        elif not isinstance(v, dict):
            self.reasons.append(f"{key}: must be an object{' or null' if nullable else ''}")
        else:
            return v
        return {}

    def field(self, d: dict, where: str, key: str, check, what: str, nullable: bool = False):
        path = f"{where}.{key}" if where else key
        if key not in d:
            self.reasons.append(f"{path}: missing")
            return None
        v = d[key]
        if v is None and nullable:
            return None
        if not check(v):
            self.reasons.append(f"{path}: must be {what}{' or null' if nullable else ''}, got {v!r}"[:200])
            return None
        return v


def _is_text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def validate(obj) -> list[str]:
    """Every reason the submission is unacceptable, one line each; an empty list means valid."""
    if not isinstance(obj, dict):
        return [f"submission must be a JSON object, got {type(obj).__name__}"]
    version = obj.get("schema_version")
    if version != SCHEMA_VERSION or not _is_int(version):
        return [f"schema_version: must be {SCHEMA_VERSION}, got {version!r}"]
    c = _Checker(obj)
    measured_source = c.field(obj, "", "source", _is_text, "a non-empty string") == "measured"
    date = c.field(obj, "", "date", _is_text, "an ISO 8601 date")
    if date is not None:
        try:
            _dt.datetime.fromisoformat(date.replace("Z", "+00:00"))
        except ValueError:
            c.reasons.append(f"date: not an ISO 8601 date: {date!r}"[:200])
    c.field(obj, "", "backend", _is_text, "a non-empty string")
    c.field(obj, "", "device", _is_text, "a non-empty string")
    rated = _check_machine(c, measured_source)
    _check_versions_and_model(c, measured_source)
    rated = _check_cluster(c, rated)
    tests = obj.get("tests", ...)
    if tests is ...:
        c.reasons.append("tests: missing")
    elif not isinstance(tests, list) or not tests:
        c.reasons.append("tests: must be a non-empty list")
    else:
        seen = set()
        for i, t in enumerate(tests):
            c.reasons.extend(_validate_test(t, f"tests[{i}]", rated, seen))
    return c.reasons


def _check_machine(c: _Checker, measured_source: bool) -> float | None:
    """machine, chip and measured_bandwidth; returns the chip's rated bandwidth (GB/s) where valid."""
    machine = c.section("machine")
    if machine:
        c.field(machine, "machine", "os", _is_text, "a non-empty string")
        for key in ("cpu_cores", "memory_bytes", "gpu_cores"):
            if machine.get(key) is not None and not (_is_int(machine[key]) and machine[key] > 0):
                c.reasons.append(f"machine.{key}: must be a positive integer or null, got {machine[key]!r}")
    chip = c.section("chip")
    rated = None
    if chip and machine and measured_source:
        from .hardware import chip_contradiction

        contradiction = chip_contradiction(machine, chip.get("name"))
        if contradiction:
            c.reasons.append(f"chip: {contradiction}; a measured submission is scored against the machine that ran it")
    if chip:
        c.field(chip, "chip", "name", _is_text, "a non-empty string", nullable=True)
        c.field(chip, "chip", "gpu_cores", lambda v: _is_int(v) and v > 0, "a positive integer", nullable=True)
        rated = c.field(chip, "chip", "rated_bandwidth_gbps", _positive, "a positive number", nullable=True)
        c.field(chip, "chip", "peak_fp16_tflops", _positive, "a positive number", nullable=True)
    measured = c.section("measured_bandwidth", nullable=True)
    if measured:
        c.field(measured, "measured_bandwidth", "backend", _is_text, "a non-empty string")
        for key in ("copy_gbps", "read_gbps"):
            c.field(measured, "measured_bandwidth", key, _positive, "a positive number")
    return rated


def _check_versions_and_model(c: _Checker, measured_source: bool) -> None:
    versions_ = c.section("versions")
    if versions_:
        for key in ("mlxllama", "mlx", "numpy", "python"):
            required = measured_source and key != "mlx"
            c.field(versions_, "versions", key, _is_text, "a version string", nullable=not required)
    model = c.section("model")
    if model:
        c.field(model, "model", "id", _is_text, "a non-empty string")
        c.field(model, "model", "quant", _is_text, "a non-empty string")
        c.field(model, "model", "sha256", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v),
                "64 lowercase hex digits", nullable=not measured_source)
        acc = c.field(model, "model", "accounting", lambda v: isinstance(v, dict), "an object")
        if acc is not None:
            for key in ACCOUNTING_FIELDS:
                c.field(acc, "model.accounting", key, lambda v: _is_int(v) and v > 0, "a positive integer")


def _check_cluster(c: _Checker, rated: float | None) -> float | None:
    """The optional cluster section; a tensor-parallel run's rated bandwidth adds up over its nodes."""
    cluster = c.obj.get("cluster")
    if cluster is None:
        return rated
    if not isinstance(cluster, dict):
        c.reasons.append("cluster: must be an object")
        return rated
    nodes = c.field(cluster, "cluster", "nodes", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    c.field(cluster, "cluster", "link", _is_text, "a non-empty string")
    mode = c.field(cluster, "cluster", "parallel", lambda v: v in ("tensor", "pipeline"), "tensor or pipeline")
    if rated and nodes and mode == "tensor":
        rated *= nodes  # every node reads its part of each token's bytes
    return rated


def _validate_test(t, where: str, rated_gbps: float | None, seen: set) -> list[str]:
    if not isinstance(t, dict):
        return [f"{where}: must be an object"]
    reasons = []
    for key in ("name", "n_prompt", "n_gen", "batch", "samples_tps", "bytes_per_step", "flops_per_token"):
        if key not in t:
            reasons.append(f"{where}.{key}: missing")
    if reasons:
        return reasons
    name, n_prompt, n_gen, batch = t["name"], t["n_prompt"], t["n_gen"], t["batch"]
    n_depth = t.get("n_depth", 0)
    if not (_is_int(n_depth) and n_depth >= 0):
        reasons.append(f"{where}.n_depth: must be a non-negative integer, got {n_depth!r}")
    if not (_is_int(n_prompt) and n_prompt >= 0):
        reasons.append(f"{where}.n_prompt: must be a non-negative integer, got {n_prompt!r}")
    if not (_is_int(n_gen) and n_gen >= 0):
        reasons.append(f"{where}.n_gen: must be a non-negative integer, got {n_gen!r}")
    if not (_is_int(batch) and batch >= 1):
        reasons.append(f"{where}.batch: must be a positive integer, got {batch!r}")
    if not reasons and n_prompt == 0 and n_gen == 0:
        reasons.append(f"{where}: n_prompt and n_gen are both 0")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        reasons.append(f"{where}.name: must look like pp512, tg128, pp512+tg128, tg128@d512 or tg128@B8, got "
                       f"{name!r}"[:200])
    elif not reasons and name != format_test_name(n_prompt, n_gen, batch, n_depth):
        reasons.append(f"{where}.name: {name!r} does not match n_prompt={n_prompt}, n_gen={n_gen}, "
                       f"n_depth={n_depth}, batch={batch} "
                       f"(expected {format_test_name(n_prompt, n_gen, batch, n_depth)!r})")
    elif name in seen:
        reasons.append(f"{where}.name: duplicate test {name!r}")
    else:
        seen.add(name)
    for key in ("bytes_per_step", "flops_per_token"):
        if not _positive(t[key]):
            reasons.append(f"{where}.{key}: must be a positive number, got {t[key]!r}")
    samples = t["samples_tps"]
    if not isinstance(samples, list) or not samples:
        reasons.append(f"{where}.samples_tps: must be a non-empty list of tokens/s")
        return reasons
    for j, s in enumerate(samples):
        if not _is_num(s):
            reasons.append(f"{where}.samples_tps[{j}]: must be a number, got {s!r}")
        elif s <= 0:
            reasons.append(f"{where}.samples_tps[{j}]: rate {s} t/s is not positive (zero or negative time)")
    if reasons or not rated_gbps or n_gen == 0:
        return reasons
    bound = batch * rated_gbps * 1e9 / t["bytes_per_step"]
    worst = max(samples)
    if worst > PLAUSIBILITY_MARGIN * bound:
        reasons.append(f"{where}: {name} {worst:.2f} t/s is {worst / bound:.2f}x the bandwidth roofline "
                       f"({bound:.2f} t/s at {rated_gbps:g} GB/s and {t['bytes_per_step'] / 1e9:.3f} GB per step): "
                       f"physically implausible")
    return reasons


def machine_fingerprint(sub: dict) -> str:
    """A short hash of what identifies the machine: its hardware block and the chip it is rated as."""
    chip = sub.get("chip") or {}
    ident = {"machine": sub.get("machine"), "chip": [chip.get("name"), chip.get("gpu_cores")]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def duplicate_key(sub: dict) -> str:
    """Submissions with equal keys are the same run submitted twice: same machine, model file, backend, versions
    and tests."""
    tests = sorted(t.get("name") for t in sub.get("tests") or [] if isinstance(t, dict))
    model = sub.get("model") or {}
    return json.dumps([machine_fingerprint(sub), model.get("sha256") or [model.get("id"), model.get("quant")],
                       sub.get("backend"), sub.get("device"), sub.get("versions"), tests], sort_keys=True, default=str)


# --- files ---

def _slug(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text or "unknown").strip("-")[:48] or "unknown"


def filename(sub: dict) -> str:
    chip = sub.get("chip") or {}
    who = chip.get("name") or (sub.get("machine") or {}).get("cpu")
    stamp = re.sub(r"[^0-9T]", "", str(sub.get("date", "")))[:15]
    model = sub.get("model") or {}
    parts = [stamp, _slug(who), _slug(model.get("id", "").rsplit("/", 1)[-1]), _slug(model.get("quant")),
             _slug(sub.get("backend"))]
    return "_".join(p for p in parts if p) + ".json"


def dumps(sub: dict) -> str:
    return json.dumps(sub, indent=1) + "\n"


def write(sub: dict, directory: str | Path) -> Path:
    """Validate, then write one new file into `directory` (created if needed); never overwrites."""
    reasons = validate(sub)
    if reasons:
        raise UsageError(f"not writing an invalid submission: {reasons[0]}"
                         + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename(sub)
    n = 2
    while path.exists():
        path = directory / f"{filename(sub)[:-5]}-{n}.json"
        n += 1
    path.write_text(dumps(sub))
    return path


def read(path: str | Path):
    """Parse one submission file (not validated). Unreadable or non-JSON files raise UsageError."""
    from ..jsonio import read_json

    return read_json(path, UsageError, 16 << 20, "submission")