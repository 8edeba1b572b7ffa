import base64
import io
import json
import re
from pathlib import Path

import pytest
from matplotlib import image as mpimg

from mlxllama.bench import report
from mlxllama.bench.roofline import LLAMA2_7B, account_shape
from mlxllama.bench.submissions import write
from test_bench_submissions import Q4, sample_submission

F16 = account_shape(LLAMA2_7B, 2.0)


def fixture_dir(tmp_path):
    d = tmp_path / "subs"
    write(sample_submission("M2 Max", tg=(60.0, 62.0), pp=(500.0,)), d)
    write(sample_submission("M2", tg=(20.0,), pp=(150.0, 152.0)), d)
    write(sample_submission("M2 Ultra", quant="F16", acc=F16, tg=(40.0,), pp=(1400.0,)), d)
    (d / "broken.json").write_text("{")
    bad = sample_submission("M2", tg=(1e5,))
    (d / "implausible.json").write_text(json.dumps(bad))
    return d


def decode_png(data: bytes):
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return mpimg.imread(io.BytesIO(data), format="png")


def test_test_rows_by_hand():
    rows = {r["test"]: r for r in report.test_rows(sample_submission("M2 Max", tg=(60.0, 62.0), pp=(500.0,)))}
    tg = rows["tg128"]
    step = Q4.bytes_per_step(64.5)
    assert tg["tps_mean"] == 61.0 and tg["tps_sd"] == pytest.approx(2 ** 0.5)
    assert tg["gbps"] == pytest.approx(61.0 * step / 1e9)
    assert tg["score"] == pytest.approx(61.0 * step / 400e9)            # rated 400 GB/s
    assert tg["score_measured"] == pytest.approx(61.0 * step / 370e9)   # measured read 370 GB/s
    assert tg["roofline_tps"] == pytest.approx(400e9 / step)
    pp = rows["pp512"]
    assert pp["tflops"] == pytest.approx(500 * Q4.flops_per_token(256.5) / 1e12)
    assert pp["flop_score"] == pytest.approx(pp["tflops"] / 13.6)
    assert pp["roofline_tps"] == pytest.approx(13.6e12 / Q4.flops_per_token(256.5))  # compute-bound
    assert tg["chip"] == "M2 Max 38c" and tg["quant"] == "Q4_0" and tg["params_b"] == pytest.approx(6.738, 1e-3)


def test_markdown_table_per_model_and_quant(tmp_path):
    subs, problems = report.load([fixture_dir(tmp_path)])
    assert len(subs) == 3
    assert len(problems) == 2
    assert any("broken.json: not valid JSON" in p for p in problems)
    assert any("implausible.json" in p and "physically implausible" in p for p in problems)
    md = report.markdown(subs)
    sections = re.split(r"^### ", md, flags=re.MULTILINE)[1:]
    assert [s.splitlines()[0] for s in sections] == ["LLaMA-2 7B · Q4_0", "LLaMA-2 7B · F16"]
    q4_rows = [line for line in sections[0].splitlines() if line.startswith("| M2")]
    assert [r.split(" | ")[0] for r in q4_rows] == ["| M2 10c", "| M2 Max 38c"]  # ordered by bandwidth
    m2max = q4_rows[1].strip("| ").split(" | ")
    header = sections[0].splitlines()[4].strip("| ").split(" | ")
    assert header[:6] == ["chip", "GPU cores", "BW GB/s", "backend", "pp512 t/s", "tg128 t/s"]
    cells = dict(zip(header, m2max))
    assert cells["tg128 t/s"] == "61.00 ± 1.41"
    assert cells["pp512 t/s"] == "500.00"
    assert cells["BW GB/s"] == "400"
    assert float(cells["score"]) == pytest.approx(61.0 * Q4.bytes_per_step(64.5) / 400e9, abs=0.005)
    assert "M2 Ultra 76c" in sections[1]


def test_png_plot_decodes_with_expected_size(tmp_path):
    subs, _ = report.load([fixture_dir(tmp_path)])
    img = decode_png(report.plot_tg_vs_bandwidth(subs))
    assert img.shape[:2] == (650, 1000)
    assert img[..., :3].std() > 0.05  # something was drawn


def test_write_report_files_and_html(tmp_path):
    rep = report.write_report([fixture_dir(tmp_path)], tmp_path / "out")
    assert rep.submissions == 3 and len(rep.problems) == 2
    assert decode_png(rep.png_path.read_bytes()).shape[:2] == (650, 1000)
    page = rep.html_path.read_text()
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(embedded) == rep.png_path.read_bytes()
    assert page.count('<table class="sortable"') == 3 and "<td>M2 Max 38c</td>" in page  # leaderboard + 2
    assert "implausible.json" in page  # skipped files are listed
    assert "http" not in page.replace("http-equiv", "")  # self-contained


def test_reference_report_has_the_m2_family(tmp_path):
    subs, problems = report.load([Path(__file__).resolve().parent.parent / "benchmarks" / "reference"])
    assert problems == [] and len(subs) == 58
    md = report.markdown(subs)
    for chip in ("M2 8c", "M2 10c", "M2 Pro 19c", "M2 Max 38c", "M2 Ultra 76c"):
        assert f"| {chip} |" in md
    q4 = md.split("### LLaMA-2 7B · Q4_0")[1].split("###")[0]
    ultra = next(line for line in q4.splitlines() if line.startswith("| M2 Ultra 76c"))
    assert "| 94.27 |" in ultra and "| 1238.48 |" in ultra


def test_batch_sweep_plot(tmp_path):
    png, predicted, measured = report.plot_batch_sweep(
        [1, 2, 4, 8, 16, 32], [60, 118, 230, 420, 600, 640], Q4, bandwidth_gbps=400, peak_tflops=13.6, ctx=64.5)
    assert decode_png(png).shape[:2] == (650, 1000)
    assert measured == pytest.approx(640 / 60)
    w, p = Q4.weight_bytes_per_token, Q4.matmul_params
    per_seq = (2 * p + Q4.attn_flops_per_position * 64.5) / 13.6e12 - Q4.kv_bytes(64.5) / 400e9
    assert predicted == pytest.approx(w / 400e9 / per_seq)
    png, predicted, _ = report.plot_batch_sweep([1, 2], [10, 19], Q4, 400, None, 64.5)
    assert predicted is None and decode_png(png).shape[:2] == (650, 1000)


def test_score_above_the_probe_names_its_cause():
    from mlxllama.bench.report import above_probe_reason

    mib = 1 << 20
    assert "fit in the 32 MiB last-level cache" in above_probe_reason(20 * mib, {"llc_bytes": 32 * mib})
    busy = above_probe_reason(500 * mib, {"llc_bytes": 32 * mib, "nbytes": 256 * mib, "load_average": 12.0}, 2)
    assert "load average 12.0 on 2 cores" in busy
    assert "one CPU thread" in above_probe_reason(500 * mib, {"threads": 1, "device": "cpu"})
