"""Figures derived from submissions: per-test rows, markdown tables, the tg-vs-bandwidth plot, an HTML page,
and the batch-sweep plot.

Scores: a tg test's achieved GB/s is (t/s / batch) * bytes_per_step; "score" divides it by the rated bandwidth,
"score_measured" by the measured read bandwidth (decode is read-dominated). A test's TFLOP/s is t/s *
flops_per_token; "flop_score" divides it by the chip's fp16 peak. Plots use matplotlib's Agg canvas directly
(no pyplot, no display).
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .roofline import Accounting, crossover_batch, measured_crossover, predicted_decode_tps
from .submissions import duplicate_key, read, validate

PLOT_SIZE_IN = (10.0, 6.5)
PLOT_DPI = 100  # -> 1000 x 650 pixels


# --- one submission -> rows ---

def chip_label(sub: dict) -> str:
    chip = sub.get("chip") or {}
    name = chip.get("name")
    if name:
        return name.replace("-core GPU)", "c").replace(" (", " ")
    return (sub.get("machine") or {}).get("cpu") or "unknown"


def _mean_sd(samples: list[float]) -> tuple[float, float]:
    return statistics.fmean(samples), statistics.stdev(samples) if len(samples) > 1 else 0.0


def test_rows(sub: dict) -> list[dict]:
    """One row per test of a valid submission, with every derived figure (None where unknown)."""
    chip = sub.get("chip") or {}
    rated = chip.get("rated_bandwidth_gbps")
    peak = chip.get("peak_fp16_tflops")
    probe = sub.get("measured_bandwidth") or {}
    measured = probe.get("read_gbps")
    cores = (sub.get("machine") or {}).get("cpu_cores")
    model = sub["model"]
    acc = model["accounting"]
    rows = []
    for t in sub["tests"]:
        mean, sd = _mean_sd(t["samples_tps"])
        tg = t["n_gen"] > 0
        tokens_per_step = t["batch"] if tg else t["batch"] * t["n_prompt"]  # pp+tg: bytes_per_step is per token
        gbps = mean / tokens_per_step * t["bytes_per_step"] / 1e9
        tflops = mean * t["flops_per_token"] / 1e12
        bw = rated or measured
        roof = None
        if bw:
            roof = tokens_per_step * bw * 1e9 / t["bytes_per_step"]
            if peak:
                roof = min(roof, peak * 1e12 / t["flops_per_token"])
        score_measured = gbps / measured if measured else None
        rows.append({
            "model": model["id"], "size_gib": acc["weight_bytes"] / 2**30,
            "file_gib": (model.get("weight_file_bytes") or acc["weight_bytes"]) / 2**30,
            "params_b": acc["params"] / 1e9,
            "quant": model["quant"], "backend": sub["backend"], "device": sub["device"], "chip": chip_label(sub),
            "test": t["name"], "n_prompt": t["n_prompt"], "n_gen": t["n_gen"], "n_depth": t.get("n_depth", 0),
            "batch": t["batch"],
            "samples": len(t["samples_tps"]), "tps_mean": mean, "tps_sd": sd,
            "gbps": gbps, "score": gbps / rated if rated else None,
            "score_measured": score_measured,
            "score_note": above_probe_reason(t["bytes_per_step"], probe, cores)
            if tg and (score_measured or 0) > 1
            else None,
            "tflops": tflops, "flop_score": tflops / peak if peak else None,
            "roofline_tps": roof,
        })
    return rows


def above_probe_reason(bytes_per_step: float, probe: dict, cores: int | None = None) -> str:
    """Why decode read faster than the bandwidth probe measured (a score above 1 against it)."""
    llc = probe.get("llc_bytes")
    load = probe.get("load_average")
    if load is not None and cores and load > 0.75 * cores:
        return (f"the machine was busy while probing (load average {load:.1f} on {cores} cores), so the probe read "
                "low: re-run on an idle machine")
    if llc and bytes_per_step <= llc:
        return (f"the {bytes_per_step / 2**20:.0f} MiB read per step fit in the {llc / 2**20:.0f} MiB last-level "
                "cache: caches, not memory, served it")
    if probe.get("nbytes") and llc and probe["nbytes"] < 2 * llc:
        return (f"the probe's {probe['nbytes'] / 2**20:.0f} MiB buffer was not much larger than the "
                f"{llc / 2**20:.0f} MiB last-level cache")
    threads = probe.get("threads")
    if threads == 1 and probe.get("device") == "cpu":
        return "the probe ran on one CPU thread while the decode kernels used every core"
    return ("the probe measured less than decode reached: a machine under load while probing (re-run it idle), "
            "or part of the model served from caches")


# --- loading ---

def find_files(paths: list[str | Path]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.rglob("*.json")) if p.is_dir() else [p])
    return files


def load(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """Valid submissions under the given files/dirs, and one line per file skipped (with its first reason)."""
    subs, problems = [], []
    for f in find_files(paths):
        try:
            obj = read(f)
        except UsageError as e:  # unreadable or not JSON
            problems.append(str(e))
            continue
        reasons = validate(obj)
        if reasons:
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            problems.append(f"{f}: {reasons[0]}{more}")
        else:
            subs.append(obj)
    return subs, problems


# --- tables ---

def dedupe(subs: list[dict]) -> tuple[list[dict], int]:
    """Drop repeats of one run (same machine fingerprint, model file, backend, versions and tests): the first
    copy stays. Returns the kept submissions and how many were dropped."""
    seen, kept = set(), []
    for s in subs:
        key = duplicate_key(s)
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept, len(subs) - len(kept)


def _groups(subs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(model, quant) -> submissions; one model file (sha256) is one group whatever its runs call it."""
    by_file: dict[object, list[dict]] = {}
    for s in subs:
        by_file.setdefault(s["model"].get("sha256") or (s["model"]["id"], s["model"]["quant"]), []).append(s)
    groups: dict[tuple[str, str], list[dict]] = {}
    for members in by_file.values():
        title = (" / ".join(dict.fromkeys(s["model"]["id"] for s in members)),
                 " / ".join(dict.fromkeys(s["model"]["quant"] for s in members)))
        groups.setdefault(title, []).extend(members)
    for members in groups.values():
        members.sort(key=lambda s: (s["chip"].get("rated_bandwidth_gbps") or 0,
                                    (s["chip"].get("name") or chip_label(s)).split(" (")[0],
                                    s["chip"].get("gpu_cores") or 0, s["date"]))
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], min(s["model"]["accounting"]["weight_bytes"]
                                                                     for s in kv[1]), kv[0][1])))


def _batch1_tests(members: list[dict]) -> list[str]:
    names = {t["name"]: (t["n_gen"] > 0, t["n_prompt"] > 0 and t["n_gen"] > 0, t.get("n_depth", 0), t["n_prompt"],
                         t["n_gen"]) for s in members for t in s["tests"] if t["batch"] == 1}
    return sorted(names, key=names.get)


def _primary_tg(names: list[str]) -> str | None:
    tgs = [n for n in names if n.startswith("tg")]
    return "tg128" if "tg128" in tgs else (tgs[0] if tgs else None)


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def table_rows(members: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one (model, quant) table: one row per submission, ordered by rated bandwidth."""
    names = _batch1_tests(members)
    tg = _primary_tg(names)
    header = ["chip", "GPU cores", "BW GB/s", "backend", *[f"{n} t/s" for n in names]]
    with_measured = any(s.get("measured_bandwidth") for s in members)
    if tg:
        header += [f"{tg} GB/s", "score", *(["score (measured)"] if with_measured else []), f"{tg} roofline t/s"]
    cells = []
    for s in members:
        rows = {r["test"]: r for r in test_rows(s)}
        chip = s["chip"]
        line = [chip_label(s), str(chip.get("gpu_cores") or "-"), _fmt(chip.get("rated_bandwidth_gbps"), 0),
                s["backend"]]
        for n in names:
            r = rows.get(n)
            line.append("-" if r is None else _fmt(r["tps_mean"]) + (f" ± {r['tps_sd']:.2f}" if r["samples"] > 1
                                                                      else ""))
        if tg:
            r = rows.get(tg)
            figures = [r["gbps"], r["score"], r["score_measured"], r["roofline_tps"]] if r else [None] * 4
            digits = [1, 2, 2, 1]
            if not with_measured:
                del figures[2], digits[2]
            line += [_fmt(v, d) for v, d in zip(figures, digits)]
        cells.append(line)
    return header, cells


def _md_table(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _primary_pp(names: list[str]) -> str | None:
    pps = [n for n in names if n.startswith("pp") and "+" not in n and "@" not in n]
    return "pp512" if "pp512" in pps else (pps[0] if pps else None)


LEADERBOARD_COLUMNS = ["model · quant", "chip", "BW GB/s", "backend", "submissions", "pp test", "best pp t/s",
                       "tg test", "best tg t/s", "tg GB/s", "score", "score (measured)"]


def leaderboard(subs: list[dict]) -> list[dict]:
    """One row per (model/quant, chip, backend): how many submissions, the best pp and tg t/s (batch 1, the
    row's main test shapes: pp512 and tg128 where run), the best tg's achieved GB/s, and the best bandwidth-normalized scores against the
    rated and the measured bandwidth. Rows are ordered by group, then best tg."""
    out = []
    for (model, quant), members in _groups(subs).items():
        cells: dict[tuple[str, str], list[dict]] = {}
        for s in members:
            cells.setdefault((chip_label(s), s["backend"]), []).append(s)
        rows = []
        for (chip, backend), runs in cells.items():
            names = _batch1_tests(runs)
            pp, tg = _primary_pp(names), _primary_tg(names)
            tests = [r for s in runs for r in test_rows(s) if r["batch"] == 1]
            pps = [r for r in tests if r["test"] == pp]
            tgs = [r for r in tests if r["test"] == tg]
            best_tg = max(tgs, key=lambda r: r["tps_mean"], default=None)
            scores = [r["score"] for r in tgs if r["score"] is not None]
            measured = [r["score_measured"] for r in tgs if r["score_measured"] is not None]
            rows.append({
                "model": model, "quant": quant, "chip": chip, "backend": backend, "submissions": len(runs),
                "rated_gbps": runs[0]["chip"].get("rated_bandwidth_gbps"),
                "pp_test": pp if pps else None, "best_pp_tps": max((r["tps_mean"] for r in pps), default=None),
                "tg_test": tg if tgs else None, "best_tg_tps": best_tg["tps_mean"] if best_tg else None,
                "tg_gbps": best_tg["gbps"] if best_tg else None,
                "score": max(scores, default=None), "score_measured": max(measured, default=None)})
        rows.sort(key=lambda r: -(r["best_tg_tps"] or 0))
        out += rows
    return out


def leaderboard_cells(rows: list[dict]) -> list[list[str]]:
    return [[f"{r['model']} · {r['quant']}", r["chip"], _fmt(r["rated_gbps"], 0), r["backend"], str(r["submissions"]),
             r["pp_test"] or "-", _fmt(r["best_pp_tps"]), r["tg_test"] or "-", _fmt(r["best_tg_tps"]),
             _fmt(r["tg_gbps"], 1), _fmt(r["score"]), _fmt(r["score_measured"])] for r in rows]


def leaderboard_markdown(subs: list[dict]) -> str:
    return _md_table(LEADERBOARD_COLUMNS, leaderboard_cells(leaderboard(subs))) + "\n"


def _sources(members: list[dict]) -> str:
    return "; ".join(dict.fromkeys(s["source"] for s in members))


def markdown(subs: list[dict]) -> str:
    parts = []
    for (model, quant), members in _groups(subs).items():
        acc = members[0]["model"]["accounting"]
        parts.append(f"### {model} · {quant}\n\n{acc['params'] / 1e9:.2f} B params, "
                     f"{acc['weight_bytes'] / 2**30:.2f} GiB of weights; source: {_sources(members)}\n")
        parts.append(_md_table(*table_rows(members)) + "\n")
    return "\n".join(parts)


# --- plots ---

def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def _spread(ys: list[float], factor: float) -> list[float]:
    """Label heights for points at one x on a log axis: sorted, each at least `factor` above the one below."""
    out: list[float] = []
    for y in sorted(ys):
        out.append(max(y, out[-1] * factor) if out else y)
    return out


def _plot_bandwidth(sub: dict) -> tuple[float | None, str]:
    rated = sub["chip"].get("rated_bandwidth_gbps")
    if rated:
        return rated, "rated"
    return (sub.get("measured_bandwidth") or {}).get("read_gbps"), "measured"


def plot_tg_vs_bandwidth(subs: list[dict]) -> bytes:
    """PNG (log-log): batch-1 tg t/s against rated bandwidth, one roofline line (bandwidth / bytes per token)
    per model and quant, one point per submission; each chip is labelled once, beside its highest point."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    groups = _groups(subs)
    bws = sorted({round(_plot_bandwidth(s)[0]) for s in subs if _plot_bandwidth(s)[0]})
    xlo, xhi = (bws[0] / 1.3, bws[-1] * 1.45) if bws else (10, 1000)
    best: dict[str, tuple[float, float]] = {}
    ys_all, roof_top = [], 0.0
    for i, ((model, quant), members) in enumerate(groups.items()):
        points, step_bytes = [], []
        for s in members:
            tg = _primary_tg(_batch1_tests([s]))
            rated, how = _plot_bandwidth(s)
            t = next((t for t in s["tests"] if t["name"] == tg), None)
            if not rated or t is None:
                continue
            y = statistics.fmean(t["samples_tps"])
            points.append((rated, y))
            step_bytes.append(t["bytes_per_step"])
            label = chip_label(s) + (" (measured GB/s)" if how == "measured" else "")
            if y > best.get(label, (0, 0))[1]:
                best[label] = (rated, y)
        if not points:
            continue
        color = f"C{i % 10}"
        per_token = statistics.median(step_bytes)
        roof_top = max(roof_top, max(p[0] for p in points) * 1.45 * 1e9 / per_token)
        ax.plot([xlo, xhi], [xlo * 1e9 / per_token, xhi * 1e9 / per_token], color=color, lw=1.2, ls="--", alpha=0.8)
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=26, zorder=3,
                   label=f"{model} {quant}: {per_token / 1e9:.2f} GB read per token (dashed: roofline)")
        ys_all += [p[1] for p in points]
    by_x: dict[float, list[tuple[float, str]]] = {}
    for label, (x, y) in best.items():
        by_x.setdefault(x, []).append((y, label))
    for x, items in by_x.items():
        items.sort()
        for (y, label), y_text in zip(items, _spread([y for y, _ in items], 1.085)):
            ax.annotate(label, (x, y), xytext=(x * 1.05, y_text), fontsize=7, color="0.2", va="center")
    if ys_all:
        ax.set_ylim(min(ys_all) / 1.6, max(max(ys_all), roof_top) * 1.15)
    ax.set_xlim(xlo, xhi)
    ax.xaxis.set_major_locator(FixedLocator(bws or [10, 100, 1000]))
    ax.xaxis.set_major_formatter("{x:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]))
    ax.yaxis.set_major_formatter("{x:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("memory bandwidth (GB/s, log scale): rated, or measured where the chip is unknown")
    ax.set_ylabel("text generation, batch 1 (tokens/s, log scale)")
    ax.set_title("Decode speed against memory bandwidth; roofline = bandwidth / bytes read per token")
    ax.grid(True, alpha=0.3)
    if ys_all:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_batch_sweep(batches: list[int], tokens_per_s: list[float], acc: Accounting, bandwidth_gbps: float,
                     peak_tflops: float | None, ctx: float, title: str = "") -> tuple[bytes, float | None,
                                                                                      float | None]:
    """PNG of decode t/s against batch size (log-log) with the bandwidth bound B*bw/(W + B*K*ctx), the compute
    bound peak/F and their crossover; returns (png, predicted crossover, measured crossover)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    top = max(max(batches) * 2, 2)
    grid = [2 ** (k / 8) for k in range(0, int(math.log2(top) * 8) + 1)]
    ax.plot(grid, [b * bandwidth_gbps * 1e9 / acc.bytes_per_step(ctx, b) for b in grid], "C0--",
            label=f"bandwidth bound ({bandwidth_gbps:g} GB/s)")
    predicted = None
    if peak_tflops:
        ax.axhline(peak_tflops * 1e12 / acc.flops_per_token(ctx), color="C1", ls="--",
                   label=f"compute bound ({peak_tflops:g} TFLOPS)")
        ax.plot(grid, [predicted_decode_tps(acc, bandwidth_gbps, peak_tflops, ctx, b) for b in grid], color="0.6",
                lw=0.8, label="roofline")
        predicted = crossover_batch(peak_tflops, acc.weight_bytes_per_token, acc.matmul_params, bandwidth_gbps,
                                    acc.kv_bytes(ctx), acc.attn_flops_per_position * ctx)
        if math.isfinite(predicted):
            ax.axvline(predicted, color="C1", ls=":", label=f"predicted crossover B* = {predicted:.1f}")
    pairs = sorted(zip(batches, tokens_per_s))
    ax.plot([b for b, _ in pairs], [t for _, t in pairs], "C3o-", label="measured")
    measured = measured_crossover(batches, tokens_per_s)
    if measured is not None:
        ax.axvline(measured, color="C3", ls=":", label=f"measured crossover = {measured:.1f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter("{x:g}")
    ax.yaxis.set_major_formatter("{x:g}")
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("decode throughput, all sequences (tokens/s)")
    ax.set_title(title or "Batched decode against the roofline")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig), predicted, measured


# --- html and files ---

def _html_table(header: list[str], cells: list[list[str]], table_id: str) -> str:
    head = "".join(f'<th title="click to sort">{html.escape(h)}</th>' for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in cells)
    return f'<table class="sortable" id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody></table>'


SORT_SCRIPT = """
// Click a column header to sort its table; click again to reverse. Numbers sort as numbers, "-" last.
function cellValue(row, i) {
  const text = row.cells[i].textContent.trim();
  const n = parseFloat(text);
  return text === "-" ? null : (isNaN(n) || !/^[-+0-9.]/.test(text) ? text.toLowerCase() : n);
}
function sortTable(table, i, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, i), y = cellValue(b, i);
    if (x === null || y === null) return (x === null) - (y === null);
    const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return descending ? -order : order;
  });
  rows.forEach(r => body.appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach((th, j) =>
    th.setAttribute("aria-sort", j === i ? (descending ? "descending" : "ascending") : "none"));
}
document.querySelectorAll("table.sortable").forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => th.addEventListener("click", () =>
    sortTable(table, i, th.getAttribute("aria-sort") === "ascending")));
});
"""


def html_page(subs: list[dict], png: bytes, problems: list[str] = (), duplicates: int = 0) -> str:
    """A self-contained page: the leaderboard and every table (sortable by clicking a header), and the plot
    embedded as a base64 data URI; no network fetches."""
    body = [f"<h2>Leaderboard</h2>\n<p>Best results per model, chip and backend ({len(subs)} submissions"
            + (f", {duplicates} duplicates dropped" if duplicates else "") + ").</p>",
            _html_table(LEADERBOARD_COLUMNS, leaderboard_cells(leaderboard(subs)), "leaderboard"),
            "<h2>All submissions</h2>"]
    for i, ((model, quant), members) in enumerate(_groups(subs).items()):
        header, cells = table_rows(members)
        acc = members[0]["model"]["accounting"]
        body.append(f"<h3>{html.escape(model)} · {html.escape(quant)}</h3>\n<p>{acc['params'] / 1e9:.2f} B params, "
                    f"{acc['weight_bytes'] / 2**30:.2f} GiB of weights; source: {html.escape(_sources(members))}</p>")
        body.append(_html_table(header, cells, f"group-{i}"))
    skipped = ""
    if problems:
        skipped = "<h2>Skipped files</h2>\n<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>"
    img = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mlxllama benchmark report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; cursor: pointer; user-select: none; }}
th[aria-sort="ascending"]::after {{ content: " \\25B2"; }} th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
td:first-child, td:nth-child(2), td:nth-child(4), th:first-child, th:nth-child(2), th:nth-child(4) {{
  text-align: left; }}
#leaderboard td:first-child {{ white-space: normal; max-width: 18em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>mlxllama benchmark report</h1>
<p>Score = achieved bandwidth (tokens/s &times; bytes read per token) &divide; the chip's rated memory bandwidth;
score (measured) divides by the read bandwidth measured on the machine. The roofline is rated bandwidth &divide;
bytes read per token.</p>
<img alt="tokens/s against memory bandwidth" src="data:image/png;base64,{img}">
{chr(10).join(body)}
{skipped}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


@dataclass
class Report:
    markdown: str
    png_path: Path
    html_path: Path
    submissions: int
    problems: list[str]
    duplicates: int = 0


def write_report(paths: list[str | Path], out_dir: str | Path) -> Report:
    subs, problems = load(paths)
    subs, duplicates = dedupe(subs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_tg_vs_bandwidth(subs)
    png_path, html_path = out / "bench-report.png", out / "bench-report.html"
    png_path.write_bytes(png)
    html_path.write_text(html_page(subs, png, problems, duplicates))
    text = f"## Leaderboard\n\n{leaderboard_markdown(subs)}\n## All submissions\n\n{markdown(subs)}"
    return Report(text, png_path, html_path, len(subs), problems, duplicates)
