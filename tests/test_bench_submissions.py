import copy
import hashlib
import json
from pathlib import Path

import pytest

from mlxllama.bench import reference, submissions
from mlxllama.bench.chips import lookup
from mlxllama.bench.hardware import Gpu, Machine
from mlxllama.bench.probe import BandwidthProbe
from mlxllama.bench.roofline import LLAMA2_7B, account_shape
from mlxllama.bench.submissions import format_test_name, make_submission, make_test, validate
from mlxllama.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
Q4 = account_shape(LLAMA2_7B, 18 / 32, head_bytes_per_weight=210 / 256)


def sample_submission(chip="M2 Max", quant="Q4_0", acc=Q4, tg=(60.0, 61.0, 59.5), pp=(500.0, 510.0),
                      batches=None, model_id="LLaMA-2 7B", date="2025-01-02T03:04:05Z"):
    """A valid measured submission (shared by the report and CLI tests)."""
    the_chip = lookup(chip) if chip else None
    if the_chip is None or the_chip.vendor == "Apple":  # the machine that chip is in
        machine = Machine(system="Darwin", os="macOS 14.5", cpu=f"Apple {the_chip.family if the_chip else 'M2 Max'}",
                          cpu_cores=12, memory_bytes=64 << 30, model="Mac14,6",
                          gpu_cores=the_chip.gpu_cores if the_chip else 38, chip=the_chip)
    else:
        machine = Machine(system="Linux", os="Linux 6.8", cpu="AMD EPYC", cpu_cores=64, memory_bytes=512 << 30,
                          gpus=[Gpu(the_chip.name, 81920)], chip=the_chip)
    tests = [make_test(512, 0, 1, list(pp), acc), make_test(0, 128, 1, list(tg), acc)]
    for b, tps in (batches or {}).items():
        tests.append(make_test(0, 128, b, tps, acc))
    return make_submission(machine=machine, chip=the_chip, model_id=model_id, model_sha256=hashlib.sha256(f"{model_id} {quant}".encode()).hexdigest(),
                           quant=quant, accounting=acc, backend="mlx", device="gpu", tests=tests,
                           measured=BandwidthProbe("mlx", "gpu", 330.0, 370.0, 1 << 26, 5), date=date)


X86 = {"system": "Linux", "os": "Linux 6.8", "cpu": "AMD EPYC 7763", "cpu_cores": 2, "memory_bytes": 8 << 30,
       "model": None, "gpu_cores": None, "gpus": []}


@pytest.mark.parametrize("machine, chip, ok", [
    (X86, "M2 (10-core GPU)", False),                                    # an M2 claimed on an x86 CPU
    (X86, "A100 SXM4 80GB", False),                                      # a GPU the machine does not have
    ({**X86, "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920}]}, "A100 SXM4 80GB", True),
    ({"system": "Darwin", "os": "macOS 14.5", "cpu": "Apple M2 Max", "gpus": []}, "M2 Ultra (76-core GPU)", False),
    ({"system": "Darwin", "os": "macOS 14.5", "cpu": "Apple M2 Max", "gpus": []}, "M2 Max (30-core GPU)", True),
    (X86, None, True),                                                   # no chip claimed
])
def test_measured_chip_must_be_the_machines(machine, chip, ok):
    sub = sample_submission()
    sub["machine"], sub["chip"]["name"] = machine, chip
    reasons = [r for r in validate(sub) if r.startswith("chip:")]
    assert (reasons == []) == ok, reasons
    if not ok:
        assert "is not" in reasons[0] and "chip" in reasons[0]
    sub["source"] = "llama.cpp discussion #4167"  # published figures: no machine to compare against
    sub["model"]["sha256"] = None
    assert [r for r in validate(sub) if r.startswith("chip:")] == []


def test_sample_is_valid_and_json_roundtrips(tmp_path):
    sub = sample_submission()
    assert validate(sub) == []
    path = submissions.write(sub, tmp_path / "out")
    assert path.parent == tmp_path / "out" and path.name.endswith("_LLaMA-2-7B_Q4_0_mlx.json")
    assert submissions.read(path) == json.loads(json.dumps(sub))
    again = submissions.write(sub, tmp_path / "out")  # one file per run, never overwritten
    assert again != path and again.exists()


def test_test_names_and_records():
    assert format_test_name(512, 0) == "pp512"
    assert format_test_name(0, 128) == "tg128"
    assert format_test_name(0, 128, 8) == "tg128@B8"
    assert format_test_name(512, 128, 1) == "pp512+tg128"
    assert format_test_name(0, 128, 1, n_depth=512) == "tg128@d512"
    assert format_test_name(512, 0, 4, n_depth=1024) == "pp512@d1024@B4"
    t = make_test(0, 128, 8, [100.0], Q4)
    assert t["bytes_per_step"] == Q4.weight_bytes_per_token + 8 * 64.5 * Q4.kv_bytes_per_position
    assert t["flops_per_token"] == 2 * Q4.matmul_params + 64.5 * Q4.attn_flops_per_position
    assert "n_depth" not in t


def test_depth_counts_the_kv_reads_at_that_depth():
    W, K = Q4.weight_bytes_per_token, Q4.kv_bytes_per_position
    t = make_test(0, 128, 1, [20.0], Q4, n_depth=4096)
    assert t["name"] == "tg128@d4096" and t["n_depth"] == 4096
    assert t["bytes_per_step"] == W + (4096 + 64.5) * K       # every step reads the 4096 cached positions too
    assert t["flops_per_token"] == 2 * Q4.matmul_params + (4096 + 64.5) * Q4.attn_flops_per_position
    pp = make_test(512, 0, 1, [300.0], Q4, n_depth=4096)
    assert pp["name"] == "pp512@d4096" and pp["bytes_per_step"] == W + (4096 + 512) * K
    assert pp["flops_per_token"] == 2 * Q4.matmul_params + (4096 + 256.5) * Q4.attn_flops_per_position
    pg = make_test(512, 128, 1, [50.0], Q4)
    assert pg["name"] == "pp512+tg128" and "n_depth" not in pg
    assert pg["bytes_per_step"] == pytest.approx((W + 512 * K + 128 * (W + (512 + 64.5) * K)) / 640)
    for test in (t, pp, pg):
        sub = sample_submission()
        sub["tests"].append(test)
        assert validate(sub) == [], test["name"]
    sub = sample_submission()
    sub["tests"].append(dict(t, name="tg128"))
    assert any("does not match" in r and "n_depth=4096" in r for r in validate(sub))
    sub["tests"][-1] = dict(t, n_depth=-1)
    assert any("n_depth: must be a non-negative integer" in r for r in validate(sub))


def mutate(path: str, value, sub=None):
    sub = copy.deepcopy(sub or sample_submission())
    *parents, last = path.split(".")
    target = sub
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    if value is KeyError:
        del target[int(last) if isinstance(target, list) else last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return validate(sub)


@pytest.mark.parametrize("path,value,expected", [
    ("schema_version", 2, "schema_version: must be 1"),
    ("schema_version", KeyError, "schema_version: must be 1"),
    ("source", KeyError, "source: missing"),
    ("source", 3, "source: must be a non-empty string"),
    ("date", "yesterday", "not an ISO 8601 date"),
    ("machine", KeyError, "machine: missing"),
    ("machine.os", None, "machine.os: must be a non-empty string"),
    ("machine.memory_bytes", -5, "machine.memory_bytes: must be a positive integer"),
    ("chip.rated_bandwidth_gbps", "400", "chip.rated_bandwidth_gbps: must be a positive number"),
    ("chip.rated_bandwidth_gbps", 0, "chip.rated_bandwidth_gbps: must be a positive number"),
    ("chip.gpu_cores", True, "chip.gpu_cores: must be a positive integer"),
    ("measured_bandwidth.copy_gbps", -1.0, "measured_bandwidth.copy_gbps: must be a positive number"),
    ("versions.numpy", None, "versions.numpy: must be a version string"),
    ("model.sha256", None, "model.sha256: must be 64 lowercase hex digits"),
    ("model.sha256", "xyz", "model.sha256: must be 64 lowercase hex digits"),
    ("model.accounting.weight_bytes_per_token", 0, "model.accounting.weight_bytes_per_token: must be a positive"),
    ("model.accounting", KeyError, "model.accounting: missing"),
    ("tests", [], "tests: must be a non-empty list"),
    ("tests", KeyError, "tests: missing"),
    ("tests.0.samples_tps", [], "tests[0].samples_tps: must be a non-empty list"),
    ("tests.0.samples_tps", [500.0, 0.0], "tests[0].samples_tps[1]: rate 0.0 t/s is not positive"),
    ("tests.1.samples_tps", [-3.0], "tests[1].samples_tps[0]: rate -3.0 t/s is not positive"),
    ("tests.1.samples_tps", ["fast"], "tests[1].samples_tps[0]: must be a number"),
    ("tests.1.samples_tps", [float("nan")], "tests[1].samples_tps[0]: must be a number"),
    ("tests.1.n_gen", 64, "tests[1].name: 'tg128' does not match"),
    ("tests.1.name", "tg 128", "tests[1].name: must look like"),
    ("tests.1.name", "pp512", "tests[1].name: 'pp512' does not match"),
    ("tests.1.batch", 0, "tests[1].batch: must be a positive integer"),
    ("tests.1.bytes_per_step", None, "tests[1].bytes_per_step: must be a positive number"),
    ("tests.1.flops_per_token", KeyError, "tests[1].flops_per_token: missing"),
])
def test_bad_submissions_are_rejected_with_a_reason(path, value, expected):
    reasons = mutate(path, value)
    assert any(expected in r for r in reasons), reasons
    assert all("\n" not in r for r in reasons)


def test_non_objects_and_duplicates():
    assert validate([1, 2]) == ["submission must be a JSON object, got list"]
    sub = sample_submission()
    sub["tests"].append(copy.deepcopy(sub["tests"][1]))
    assert any("duplicate test 'tg128'" in r for r in validate(sub))


def test_implausible_tg_above_the_bandwidth_roofline():
    # M2 Max: 400 GB/s over ~3.785 GB per token -> roofline ~105.7 t/s; 10% margin -> 116.2 t/s
    roof = 400e9 / sample_submission()["tests"][1]["bytes_per_step"]
    assert validate(sample_submission(tg=(roof * 1.09,))) == []
    reasons = validate(sample_submission(tg=(60.0, roof * 1.11)))
    assert len(reasons) == 1 and "physically implausible" in reasons[0] and "1.11x" in reasons[0]
    # batched: the bound scales with the batch (8 sequences share one read of the weights)
    sub = sample_submission(batches={8: [5 * roof]})
    assert validate(sub) == []
    # no rated bandwidth: nothing to hold the figure against
    sub = sample_submission(chip=None, tg=(10 * roof,))
    assert sub["chip"]["rated_bandwidth_gbps"] is None and validate(sub) == []


def test_reference_source_may_omit_hash_and_versions():
    sub = sample_submission()
    sub["source"] = "some published table"
    sub["model"]["sha256"] = None
    sub["versions"] = {"mlxllama": None, "mlx": None, "numpy": None, "python": None}
    assert validate(sub) == []


def test_write_refuses_invalid(tmp_path):
    sub = sample_submission(tg=(1e6,))
    with pytest.raises(UsageError, match="not writing an invalid submission"):
        submissions.write(sub, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_read_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="bad.json: not valid JSON"):
        submissions.read(bad)
    with pytest.raises(UsageError, match="cannot read"):
        submissions.read(tmp_path / "missing.json")


def test_model_sha256(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    assert submissions.model_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "config.json").write_text("{}")
    digest = submissions.model_sha256(tmp_path)
    assert len(digest) == 64 and digest != submissions.model_sha256(f)


def test_reference_data_validates_and_matches_the_csv():
    csv_path = REPO / "benchmarks" / "reference" / "llamacpp-4167-apple-silicon.csv"
    expected = reference.convert(csv_path.read_text())
    assert len(expected) == 58  # 21 chip rows x 3 quants, minus 5 rows without F16
    for folder in (REPO / "benchmarks" / "reference", reference.package_dir()):
        files = {p.name: p for p in folder.glob("*.json")}
        assert set(files) == set(expected), folder
        for name, path in files.items():
            sub = submissions.read(path)
            assert validate(sub) == [], name
            assert sub == json.loads(json.dumps(expected[name])), name


def test_reference_figures():
    subs = reference.convert((REPO / "benchmarks" / "reference" / "llamacpp-4167-apple-silicon.csv").read_text())
    m2u = subs["llamacpp-4167_M2-Ultra-76c_llama2-7b_Q4_0.json"]
    assert m2u["source"] == "llama.cpp discussion #4167, build 8e672ef"
    assert m2u["chip"]["rated_bandwidth_gbps"] == 800 and m2u["chip"]["gpu_cores"] == 76
    assert [(t["name"], t["samples_tps"]) for t in m2u["tests"]] == [("pp512", [1238.48]), ("tg128", [94.27])]
    assert m2u["model"]["accounting"]["weight_bytes"] / 2**30 == pytest.approx(3.56, abs=0.005)
    assert "llamacpp-4167_M1-7c_llama2-7b_F16.json" not in subs  # empty in the table
