import json

import pytest

from mlxllama.bench import chips
from mlxllama.bench.chips import find, lookup
from mlxllama.errors import UsageError

# family -> (GPU-core options, rated GB/s per option), from Apple's published specs
APPLE = {
    "M1": ((7, 8), (68.25, 68.25)), "M1 Pro": ((14, 16), (200, 200)), "M1 Max": ((24, 32), (400, 400)),
    "M1 Ultra": ((48, 64), (800, 800)),
    "M2": ((8, 10), (100, 100)), "M2 Pro": ((16, 19), (200, 200)), "M2 Max": ((30, 38), (400, 400)),
    "M2 Ultra": ((60, 76), (800, 800)),
    "M3": ((8, 10), (100, 100)), "M3 Pro": ((14, 18), (150, 150)), "M3 Max": ((30, 40), (300, 400)),
    "M3 Ultra": ((60, 80), (819, 819)),
    "M4": ((8, 10), (120, 120)), "M4 Pro": ((16, 20), (273, 273)), "M4 Max": ((32, 40), (410, 546)),
}


def test_every_apple_variant_and_core_option_is_listed():
    for family, (cores, bws) in APPLE.items():
        rows = sorted((c for c in chips.all_chips() if c.family == family), key=lambda c: c.gpu_cores)
        assert [c.gpu_cores for c in rows] == list(cores), family
        assert [c.bandwidth_gbps for c in rows] == list(bws), family


def test_every_row_has_a_source_and_sane_numbers():
    raw = json.loads(chips.DATA.read_text())["chips"]
    assert len(raw) == len(chips.all_chips())
    for row in raw:
        assert len(row["source"]) > 20, row["name"]
        assert row["bandwidth_gbps"] > 0 and row["gpu_cores"] > 0
        assert row["fp16_tflops"] > 0
    names = [c.name for c in chips.all_chips()]
    assert len(names) == len(set(names))


def test_reference_gpus():
    a100 = {c.name: c for c in chips.all_chips() if c.family == "A100"}
    assert {c.bandwidth_gbps for c in a100.values()} == {1555, 1935, 2039}
    assert all(c.fp16_tflops == 312 for c in a100.values())
    assert lookup("A100 80GB PCIe").bandwidth_gbps == 1935
    assert lookup("H100 SXM").bandwidth_gbps == 3350
    assert lookup("H100 SXM").fp16_tflops == pytest.approx(989.4)
    assert lookup("H100 PCIe").bandwidth_gbps == 2000
    assert lookup("H200").bandwidth_gbps == 4800


@pytest.mark.parametrize("name", ["M2 Max", "m2 max", "Apple M2 Max", "  APPLE   m2-max ", "M2 Max 38",
                                  "M2 Max (38-core GPU)", "M2 MAX"])
def test_lookup_is_forgiving(name):
    chip = lookup(name)
    assert chip.family == "M2 Max" and chip.gpu_cores == 38 and chip.bandwidth_gbps == 400


def test_family_name_picks_the_top_configuration_and_cores_pick_a_variant():
    assert lookup("M3 Max").gpu_cores == 40 and lookup("M3 Max").bandwidth_gbps == 400
    assert lookup("M3 Max 30-core").bandwidth_gbps == 300
    assert lookup("M3 Max", gpu_cores=30).bandwidth_gbps == 300
    assert lookup("Apple M4 Max (32-core GPU)").bandwidth_gbps == 410
    assert lookup("M2").family == "M2" and lookup("M2").gpu_cores == 10  # not "M2 Pro"
    assert lookup("A100").name == "A100 SXM4 80GB"
    assert lookup("H100").name == "H100 SXM5 80GB"


def test_nvidia_smi_names_match():
    assert lookup("NVIDIA A100-SXM4-80GB").bandwidth_gbps == 2039
    assert lookup("NVIDIA A100-SXM4-40GB").bandwidth_gbps == 1555
    assert lookup("NVIDIA A100 80GB PCIe").bandwidth_gbps == 1935
    assert lookup("NVIDIA H100 80GB HBM3").name == "H100 SXM5 80GB"
    assert lookup("NVIDIA H100 PCIe").name == "H100 PCIe 80GB"


def test_unknown_names():
    assert find("M9 Hyper") is None
    assert find("") is None
    assert find("M2 Max", gpu_cores=33) is None
    with pytest.raises(UsageError, match="unknown chip 'Pentium 4'.*M2 Max"):
        lookup("Pentium 4")


def test_apple_fp16_peak_matches_published_figures():
    # Apple quoted 2.6 (M1 8c), 3.6 (M2 10c), 13.6 (M2 Max 38c), 27.2 (M2 Ultra 76c) TFLOPS
    for name, published in [("M1 8", 2.6), ("M2 10", 3.6), ("M2 Max 38", 13.6), ("M2 Ultra 76", 27.2)]:
        assert lookup(name).fp16_tflops == pytest.approx(published, rel=0.02), name
