"""`mlxllama bench` (run, validate, report) and `mlxllama estimate`: parse options, call mlxllama.bench, print."""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from mlxllama.errors import UsageError

bench_app = typer.Typer(
    help="Benchmark prompt processing (pp) and text generation (tg) llama-bench style, with achieved GB/s and "
         "bandwidth-normalized scores.\n\n"
         "\b\n"
         "  mlxllama bench -m default -p 512 -n 128 -r 5 --batch 1,8,64\n"
         "  mlxllama bench validate results/*.json\n"
         "  mlxllama bench report benchmarks/reference --out report/",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)

OUTPUT_FORMATS = ("md", "json", "csv")


@dataclass
class BenchOptions:
    models: list[str]          # empty: the default model
    n_prompt: int
    n_gen: int
    repetitions: int
    batches: list[int]
    backend: str
    output: str
    chip: object | None        # mlxllama.bench.chips.Chip
    bandwidth_gbps: float | None
    submit: Path | None
    plot: Path | None


def parse_batches(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64] (sorted, deduplicated); every entry a positive integer."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--batch: {part!r} is not a positive integer (write e.g. 1,8,64)")
        out.add(int(part))
    return sorted(out)


def parse_depths(text: str) -> list[int]:
    """-d '0,512' -> [0, 512]: KV-cache depths before each timed test (llama-bench's -d)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit():
            raise UsageError(f"-d/--depth: {part!r} is not a non-negative integer (write e.g. 0,512)")
        if int(part) not in out:
            out.append(int(part))
    return out


def parse_pg(text: str | None) -> tuple[int, int] | None:
    """-pg '512,128' -> (512, 128): a prompt then generation, timed as one (llama-bench's -pg)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"-pg: expected PP,TG (two positive integers, e.g. 512,128), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_options(models, n_prompt, n_gen, repetitions, batch, backend, output, chip, bandwidth, submit,
                  plot) -> BenchOptions:
    from mlxllama.bench.chips import lookup

    if n_prompt < 0 or n_gen < 0:
        raise UsageError("-p and -n must be >= 0")
    if n_prompt == 0 and n_gen == 0:
        raise UsageError("nothing to run: -p and -n are both 0")
    if repetitions < 1:
        raise UsageError(f"-r must be at least 1, got {repetitions}")
    if output not in OUTPUT_FORMATS:
        raise UsageError(f"-o must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}")
    if bandwidth is not None and not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise UsageError(f"--bandwidth must be a positive number of GB/s, got {bandwidth}")
    if submit is not None and submit.exists() and not submit.is_dir():
        raise UsageError(f"--submit {submit}: exists and is not a directory")
    return BenchOptions(models=list(models or []), n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                        batches=parse_batches(batch), backend=backend, output=output,
                        chip=lookup(chip) if chip else None, bandwidth_gbps=bandwidth, submit=submit, plot=plot)


def check_chip_claim(chip) -> None:
    """--chip must not contradict the machine the run is on: an M2 claimed on an x86 CPU would score and submit
    numbers against a bandwidth the run never had."""
    if chip is None:
        return
    from mlxllama.bench import hardware

    reason = hardware.chip_contradiction(hardware.detect().to_dict(), chip.name)
    if reason:
        raise UsageError(f"--chip: {reason}. Drop --chip to use the detected machine, or pass "
                         "--bandwidth GB/s to score against a figure of your own")


# --- formatting ---

def _num(v, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _params(n_billion: float) -> str:
    return f"{n_billion:.2f} B" if n_billion >= 1 else f"{n_billion * 1e3:.2f} M"


TABLE_COLUMNS = ("model", "weights", "resident", "params", "quant", "backend", "device", "test", "t/s", "GB/s", "score",
                 "score (meas)", "TFLOP/s", "FLOP score", "roofline t/s")


def table_cells(row: dict) -> list[str]:
    """One llama-bench style row; bandwidth figures only for tg tests, FLOP figures for all."""
    tg = row["n_gen"] > 0
    tps = f"{row['tps_mean']:.2f} ± {row['tps_sd']:.2f}"
    meas = _num(row["score_measured"]) + (" †" if row.get("score_note") else "")
    return [row["model"], f"{row['file_gib']:.2f} GiB", f"{row['size_gib']:.2f} GiB", _params(row["params_b"]),
            row["quant"], row["backend"], row["device"], row["test"], tps, _num(row["gbps"], 1) if tg else "-",
            _num(row["score"]) if tg else "-", meas if tg else "-",
            _num(row["tflops"], 3), _num(row["flop_score"]), _num(row["roofline_tps"], 1)]


def machine_line(sub: dict) -> str:
    chip = sub.get("chip") or {}
    rated = chip.get("rated_bandwidth_gbps")
    who = chip.get("name") or (sub.get("machine") or {}).get("cpu") or "unknown machine"
    text = f"{who}: rated {rated:g} GB/s" if rated else f"{who}: rated bandwidth unknown (pass --chip or --bandwidth)"
    if chip.get("peak_fp16_tflops"):
        text += f", {chip['peak_fp16_tflops']:g} TFLOPS fp16"
    m = sub.get("measured_bandwidth")
    if m:
        text += f"; measured copy {m['copy_gbps']:.1f} GB/s, read {m['read_gbps']:.1f} GB/s ({m['backend']})"
    return text


def sweep_lines(sub: dict) -> list[str]:
    """The measured and predicted crossover of each batch sweep (tg tests differing only in batch)."""
    from mlxllama.bench.roofline import (MIN_SWEEP_POINTS, Accounting, crossover_batch, mean_context,
                                         measured_crossover, sweep_flattened)

    sweeps: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for t in sub["tests"]:
        if t["n_gen"] > 0 and not t["n_prompt"]:  # tg tests; the key is (depth, n_gen)
            sweeps.setdefault((t.get("n_depth", 0), t["n_gen"]), []).append(
                (t["batch"], sum(t["samples_tps"]) / len(t["samples_tps"])))
    chip = sub.get("chip") or {}
    bw = chip.get("rated_bandwidth_gbps") or (sub.get("measured_bandwidth") or {}).get("read_gbps")
    peak = chip.get("peak_fp16_tflops")
    acc = Accounting.from_dict(sub["model"]["accounting"])
    lines = []
    for (n_depth, n_gen), points in sweeps.items():
        if len(points) < 2:
            continue
        measured = measured_crossover([b for b, _ in points], [t for _, t in points])
        name = f"tg{n_gen}" + (f"@d{n_depth}" if n_depth else "")
        if measured is None:
            text = (f"batch sweep {name}: measured crossover not measured ({len(points)} batch sizes; it takes "
                    f"at least {MIN_SWEEP_POINTS} from batch 1 up to where t/s stops rising, e.g. "
                    "--batch 1,2,4,8,16,32,64)")
        else:
            flat = sweep_flattened([b for b, _ in points], [t for _, t in points])
            text = f"batch sweep {name}: measured crossover {'' if flat else '>= '}{measured:.1f}" + \
                ("" if flat else f" (t/s still rising at batch {max(b for b, _ in points)}: a lower bound)")
        if bw and peak:
            ctx = n_depth + mean_context(0, n_gen)
            predicted = crossover_batch(peak, acc.weight_bytes_per_token, acc.matmul_params, bw, acc.kv_bytes(ctx),
                                        acc.attn_flops_per_position * ctx)
            text += f", predicted {_num(predicted, 1)} ({bw:g} GB/s, {peak:g} TFLOPS)"
        else:
            text += ", predicted unknown (no peak TFLOPS: pass --chip)"
        lines.append(text)
    return lines


def format_results(subs: list[dict], fmt: str) -> str:
    from mlxllama.bench.report import test_rows

    rows = [r for s in subs for r in test_rows(s)]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    lines = list(dict.fromkeys(machine_line(s) for s in subs))
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---:" if c in ("t/s",) else "---"
                                                                      for c in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    notes = list(dict.fromkeys(f"† {r['test']}: score (meas) {r['score_measured']:.2f} > 1 because "
                               f"{r['score_note']}" for r in rows if r.get("score_note")))
    lines += [""] + ["weights: the tensors as stored in the file; resident: as the backend holds and reads them "
                     "(numpy keeps 4/8-bit weights packed, and widens them to float32 only with --numpy-weights "
                     "float32, or with auto where numba is missing)"] + notes
    sweeps = [line for s in subs for line in sweep_lines(s)]
    if sweeps:
        lines += [""] + sweeps
    return "\n".join(lines)


@contextmanager
def progress_bar():
    """A rich progress bar on stderr (only on a terminal); yields the callback run_bench calls as
    progress(label, done, total), total 0 for a step of unknown length."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("bench", total=None)

        def update(label: str, done: int, total: int) -> None:
            bar.update(task, description=f"{label} {done}/{total} runs" if total else label, completed=done,
                       total=total or None)

        yield update


def write_sweep_plots(subs: list[dict], path: Path) -> list[Path]:
    from mlxllama.bench.report import plot_batch_sweep
    from mlxllama.bench.roofline import Accounting, mean_context

    written = []
    for i, sub in enumerate(subs):
        tests = [t for t in sub["tests"] if t["n_gen"] > 0 and not t["n_prompt"]]
        if len({t["batch"] for t in tests}) < 2:
            continue
        chip = sub.get("chip") or {}
        bw = chip.get("rated_bandwidth_gbps") or (sub.get("measured_bandwidth") or {}).get("read_gbps")
        if not bw:
            continue
        t0 = tests[0]
        same = [t for t in tests if (t.get("n_depth", 0), t["n_gen"]) == (t0.get("n_depth", 0), t0["n_gen"])]
        png, _, _ = plot_batch_sweep([t["batch"] for t in same],
                                     [sum(t["samples_tps"]) / len(t["samples_tps"]) for t in same],
                                     Accounting.from_dict(sub["model"]["accounting"]), bw,
                                     chip.get("peak_fp16_tflops"), t0.get("n_depth", 0) + mean_context(0, t0["n_gen"]),
                                     title=f"{sub['model']['id']} {sub['model']['quant']} on "
                                           f"{chip.get('name') or sub['device']}: batched decode")
        out = path if len(subs) == 1 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
        written.append(out)
    return written


# --- commands ---

@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    model: Optional[List[str]] = typer.Option(None, "-m", "--model", metavar="MODEL",
                                              help="Model to benchmark (repeatable); "
                                                   "default: the bundled default model."),
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="Prompt tokens for the pp test; 0 skips it."),
    n_gen: int = typer.Option(128, "-n", "--n-gen", help="Generated tokens for the tg test; 0 skips it."),
    repetitions: int = typer.Option(5, "-r", "--repetitions", help="Timed repetitions (after a warm-up)."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated decode batch sizes, e.g. 1,8,64."),
    backend: str = typer.Option("auto", "--backend", help="auto, mlx or numpy."),
    output: str = typer.Option("md", "-o", "--output", help="md, json or csv."),
    chip: Optional[str] = typer.Option(None, "--chip", help="Chip to score against, e.g. 'M2 Max' "
                                                            "(default: detected)."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Rated bandwidth in GB/s (overrides "
                                                                        "the chip's)."),
    submit: Optional[Path] = typer.Option(None, "--submit", help="Write one submission JSON per model here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the batch-sweep PNG here."),
    depth: str = typer.Option("0", "-d", "--depth", help="Tokens already in the KV cache before each timed test "
                                                         "(comma-separated, e.g. 0,4096); their KV reads count."),
    pg: Optional[str] = typer.Option(None, "-pg", help="PP,TG: a prompt then generation, timed as one "
                                                       "(e.g. 512,128)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="8 or 4: a quantized KV cache (counted in the "
                                                                  "bytes per token)."),
    kv_group_size: int = typer.Option(64, "--kv-group-size", help="Group size of --kv-bits."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="Under mlx.launch: tensor or pipeline over "
                                                                    "the ranks; the submission records them."),
    link: Optional[str] = typer.Option(None, "--link", help="With --parallel: the link the ranks use, recorded "
                                                            "(tb4, tb5, tb5-ring, 10gbe, 1gbe, loopback...)."),
    speculate: Optional[str] = typer.Option(None, "--speculate", help="lookup or draft: time speculative against "
                                            "plain decoding on task prompts (acceptance, tokens per forward, "
                                            "effective score)."),
    num_draft: int = typer.Option(8, "--num-draft", help="With --speculate: most tokens drafted per forward."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="With --speculate draft: the draft "
                                              "model (same vocabulary)."),
) -> None:
    """Run the benchmark (when no subcommand is given).

    Examples:

    \b
      mlxllama bench -m default -p 512 -n 128 -r 5
      mlxllama bench --batch 1,2,4,8,16,32,64 -n 32 --plot sweep.png --chip "M2 Max" --submit results/

      mlxllama bench --speculate lookup -n 128 -r 3
    """
    if ctx.invoked_subcommand is not None:
        return
    opts = parse_options(model, n_prompt, n_gen, repetitions, batch, backend, output, chip, bandwidth, submit, plot)
    shapes = {"depths": parse_depths(depth), "pg": parse_pg(pg)}
    check_chip_claim(opts.chip)
    if speculate is not None or draft_model is not None:
        from mlxllama.bench.speculative import run_cli

        typer.echo(run_cli(models=opts.models, backend=opts.backend, speculate=speculate, n_gen=opts.n_gen,
                           num_draft=num_draft, draft_model=draft_model, repetitions=opts.repetitions,
                           bandwidth_gbps=opts.bandwidth_gbps, chip=opts.chip))
        return
    from mlxllama.bench.run import run_bench
    from mlxllama.bench.submissions import validate, write
    from mlxllama.cache import CacheSettings

    kv = CacheSettings(kv_bits=kv_bits, kv_group_size=kv_group_size).validate()

    with progress_bar() as progress:
        subs = run_bench(models=opts.models, n_prompt=opts.n_prompt, n_gen=opts.n_gen,
                         repetitions=opts.repetitions, batches=opts.batches, backend=opts.backend, chip=opts.chip,
                         bandwidth_gbps=opts.bandwidth_gbps, progress=progress, cache_settings=kv,
                         parallel=parallel, link=link, **shapes)
    if subs is None:  # a rank other than 0 under mlx.launch: it served rank 0's runs
        return
    typer.echo(format_results(subs, opts.output))
    for sub in subs:
        for reason in validate(sub):
            typer.echo(f"warning: {sub['model']['id']}: {reason}", err=True)
    if opts.plot is not None:
        for path in write_sweep_plots(subs, opts.plot):
            typer.echo(f"wrote {path}", err=True)
    if opts.submit is not None:
        for sub in subs:
            typer.echo(f"wrote {write(sub, opts.submit)}", err=True)


@bench_app.command("validate")
def validate_cmd(files: List[Path] = typer.Argument(..., metavar="FILE",
                                                   help="Submission JSON files.")) -> None:
    """Check submissions: one reason per line for each rejected file; exit 1 if any is rejected.

    Example:

    \b
      mlxllama bench validate results/*.json
    """
    from mlxllama.bench.submissions import read, validate

    rejected = 0
    for f in files:
        try:
            reasons = validate(read(f))
        except UsageError as e:
            reasons = [str(e).removeprefix(f"{f}: ")]
        for reason in reasons:
            typer.echo(f"{f}: {reason}")
        if reasons:
            rejected += 1
        else:
            typer.echo(f"{f}: ok")
    if rejected:
        raise typer.Exit(1)


@bench_app.command("report")
def report_cmd(
    sources: Optional[List[str]] = typer.Argument(None, metavar="SOURCE",
                                                 help="Submission files or folders, or hf:OWNER/NAME for a Hugging "
                                                      "Face dataset (default: the bundled llama.cpp #4167 "
                                                      "reference data)."),
    out: Path = typer.Option(Path("bench-report"), "--out", help="Folder for bench-report.png and .html."),
    include_prs: bool = typer.Option(False, "--include-prs", help="With hf:OWNER/NAME, also preview the "
                                                                  "submissions in its open pull requests."),
    with_reference: bool = typer.Option(False, "--with-reference", help="Add the bundled llama.cpp #4167 rows "
                                                                        "(copies already among the sources count "
                                                                        "once)."),
) -> None:
    """Aggregate submissions: print the leaderboard and markdown tables; write a PNG plot and a self-contained
    HTML page. Duplicates (the same run submitted twice) count once.

    Examples:

    \b
      mlxllama bench report benchmarks/reference --out report/

      mlxllama bench report hf:mlxllama/bench-submissions --include-prs --with-reference --out report/
    """
    from mlxllama.bench.reference import package_dir
    from mlxllama.bench.report import write_report

    paths = []
    for source in sources or [str(package_dir())]:
        if source.startswith("hf:"):
            from mlxllama.bench.hub_submit import fetch

            paths += fetch(source[3:], include_prs=include_prs)
        else:
            paths.append(Path(source))
    if with_reference and sources:
        paths.append(package_dir())
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    rep = write_report(paths, out)
    for problem in rep.problems:
        typer.echo(f"skipped {problem}", err=True)
    if rep.submissions == 0:
        raise UsageError(f"no valid submissions in {', '.join(map(str, sources or paths))}")
    typer.echo(rep.markdown)
    dropped = f", {rep.duplicates} duplicates dropped" if rep.duplicates else ""
    typer.echo(f"wrote {rep.png_path} and {rep.html_path} ({rep.submissions} submissions{dropped})", err=True)


@bench_app.command("submit")
def submit_cmd(
    files: List[Path] = typer.Argument(..., help="Submission JSON files (from bench --submit or bench import)."),
    repo: Optional[str] = typer.Option(None, "--repo", help="Dataset repo OWNER/NAME (default: "
                                                            "$MLXLLAMA_BENCH_REPO, else mlxllama/bench-submissions)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print exactly what would be sent; send nothing."),
) -> None:
    """Open one pull request on the Hugging Face dataset adding these submissions (validated, and checked to
    carry no host name, user name, serial number or path). Needs a token: `hf auth login` or HF_TOKEN.

    Examples:

      mlxllama bench submit results/*.json --dry-run

      mlxllama bench submit results/*.json --repo me/my-bench
    """
    from mlxllama.bench import hub_submit

    p = hub_submit.plan(files, repo or hub_submit.default_repo())
    if dry_run:
        typer.echo(p.describe())
        typer.echo(f"dry run: nothing sent ({len(p.files)} files)", err=True)
        return
    url = hub_submit.submit(p)
    typer.echo(f"opened {url} ({len(p.files)} submissions)")


@bench_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="llama-bench output: -o json or -o jsonl."),
    fmt: str = typer.Option(..., "--format", help="Input format: llama-bench."),
    out: Path = typer.Option(..., "--out", help="Folder for the submission files."),
    model: Optional[Path] = typer.Option(None, "--model", help="The GGUF file llama-bench ran (default: its "
                                                               "model_filename, if it exists here; else the "
                                                               "accounting comes from its model_size and "
                                                               "model_n_params)."),
    chip: Optional[str] = typer.Option(None, "--chip", help="Chip to score against (default: from llama-bench's "
                                                            "gpu_info/cpu_info)."),
) -> None:
    """Turn llama-bench results into submission files, one per model and setting.

    Example:

      llama-bench -m model.gguf -o json > lb.json && mlxllama bench import lb.json --format llama-bench --out results/
    """
    from mlxllama.bench.llama_bench import import_file

    if fmt != "llama-bench":
        raise UsageError(f"--format: only llama-bench is supported, got {fmt!r}")
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    if model is not None and not model.is_file():
        raise UsageError(f"--model {model}: no such file")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    for path in import_file(file, out, model=model, chip=chip):
        typer.echo(f"wrote {path}")


def estimate(
    chip: Optional[str] = typer.Option(None, "--chip", help="Chip from the table, e.g. 'M2 Ultra' or 'A100'."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="Memory bandwidth in GB/s (overrides the "
                                                                        "chip's)."),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="Peak TFLOPS (overrides the chip's fp16 peak)."),
    model: Optional[str] = typer.Option(None, "-m", "--model", help="Model to account exactly (its real tensors)."),
    params: Optional[str] = typer.Option(None, "--params", help="Parameter count instead of a model, e.g. 7B: "
                                         "the shape of the nearest known model (Llama-3.2-1B/3B, Llama-2-7B/13B, "
                                         "Llama-3.1-8B/70B/405B, SmolLM2, ...)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A model's config.json (or its folder) for the "
                                          "shape, instead of --params; no weights needed."),
    bits: Optional[int] = typer.Option(None, "--bits", help="Bits per weight with --params/--config: 2-8, or "
                                                            "16/32 for float (default 16)."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size with --params/--config."),
    ctx: int = typer.Option(512, "--ctx", help="Context length held in the KV cache."),
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="Prompt length for the pp prediction."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Machines of this chip (mlx.launch ranks): predict "
                                                              "tensor- and pipeline-parallel decode."),
    link: str = typer.Option("tb5", "--link", help="With --nodes: tb4 | tb5 (jaccl RDMA) | tb5-ring | 10gbe | 1gbe."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="With --nodes: tensor or pipeline (default: "
                                                                    "both, and which wins)."),
) -> None:
    """Predict tg and pp tokens/s from the roofline, and the batch where decode turns compute-bound.

    Examples:

    \b
      mlxllama estimate --chip "M2 Ultra" --params 7B --bits 4
      mlxllama estimate --bandwidth 1935 --tflops 312 --params 7B --bits 16
      mlxllama estimate --chip "M2 Max" -m default
      mlxllama estimate --chip "M2 Max" --config ./Llama-3.2-3B-Instruct/config.json --bits 4

      mlxllama estimate --chip "M2 Ultra" --params 70B --bits 4 --nodes 2 --link tb5
    """
    from mlxllama.bench import roofline

    if sum(x is not None for x in (model, params, config)) != 1:
        raise UsageError("give one of -m MODEL, --params N (e.g. --params 7B --bits 4) or --config config.json")
    if model is not None and bits is not None:
        raise UsageError("--bits applies to --params and --config; a model's own tensors set its bits")
    the_chip, bw, peak = _rated(chip, bandwidth, tflops)
    acc, what, args, weights = _accounted(model, params, config, bits, group_size)
    est = roofline.estimate(acc, bw, peak, ctx=ctx, n_prompt=n_prompt)
    typer.echo(format_estimate(est, acc, what, the_chip))
    if nodes is not None or parallel is not None:
        from mlxllama.bench import cluster

        ln = cluster.link(link)
        shape = (args.num_hidden_layers, args.hidden_size, args.vocab_size) if model is not None \
            else cluster.nearest_shape(acc.params)
        ests = [cluster.estimate(bytes_per_token=acc.bytes_per_token(ctx), weight_bytes=acc.weight_bytes,
                                 layers=shape[0], hidden=shape[1], vocab=shape[2], bandwidth_gbps=bw,
                                 nodes=nodes or 2, ln=ln, mode=m) for m in ([parallel] if parallel else cluster.MODES)]
        typer.echo("\n".join(cluster.format_cluster(est.tg_tps, ests, shape[0])))
    if model is not None:  # the fit check's line, as `mlxllama fit` prints it
        from mlxllama_cli.quality import estimate_memory_lines

        for line in estimate_memory_lines(args, weights, ctx, the_chip):
            typer.echo(line)


def _rated(chip: Optional[str], bandwidth: Optional[float], tflops: Optional[float]):
    """(the chip or None, GB/s, peak TFLOPS or None) from --chip and the overrides, checked."""
    from mlxllama.bench.chips import lookup

    the_chip = lookup(chip) if chip else None
    bw = bandwidth if bandwidth is not None else (the_chip.bandwidth_gbps if the_chip else None)
    if bw is None:
        raise UsageError("give --chip NAME or --bandwidth GB/s")
    if not (bw > 0 and math.isfinite(bw)):
        raise UsageError(f"--bandwidth must be a positive number of GB/s, got {bw}")
    peak = tflops if tflops is not None else (the_chip.fp16_tflops if the_chip else None)
    if peak is not None and not (peak > 0 and math.isfinite(peak)):
        raise UsageError(f"--tflops must be a positive number, got {peak}")
    return the_chip, bw, peak


def _accounted(model: Optional[str], params: Optional[str], config: Optional[Path], bits: Optional[int],
               group_size: int):
    """(the accounting, what it describes, the model's args and weights: None with --params or --config)."""
    from mlxllama.bench import roofline

    if model is not None:
        from mlxllama.api import load_weights

        loaded = load_weights(model)
        args, weights = loaded[0], loaded[1]
        acc = roofline.account_weights(args, weights)
        what = (f"{model}: {acc.params / 1e9:.3f} B params ({roofline.quant_label(weights)}), "
                f"{args.num_hidden_layers} layers, {args.num_key_value_heads} KV heads x {args.head_dim}")
        return acc, what, args, weights
    bits = 16 if bits is None else bits
    per_weight = roofline.quant_bytes_per_weight(bits, group_size)
    storage = (f"{bits}-bit" + (f", group {group_size}" if bits < 16 else "") + f" ({per_weight:.4g} bytes/weight)")
    if config is not None:
        shape, name, exact = _config_shape(config), str(config), True
    else:
        n = roofline.parse_params(params)
        name, shape, exact = roofline.nearest_shape(n)
    if exact:
        acc = roofline.account_shape(shape, per_weight, norm_bytes=2)
        return acc, f"{name}'s shape: {acc.params / 1e9:.2f} B params at {storage}; {_shape_text(shape)}", None, None
    acc = roofline.account_params(n, bits, group_size, shape=shape)
    return acc, (f"{acc.params / 1e9:.2f} B params at {storage}; no known model of that size: KV cache "
                 f"shaped like {name}, the nearest ({_shape_text(shape)})"), None, None


def _config_shape(path: Path):
    from mlxllama.config import ConfigError, from_hf_dict, read_json

    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    return from_hf_dict(read_json(path, ConfigError, 1 << 20, "config"), str(path))


def _shape_text(args) -> str:
    gqa = args.num_attention_heads // args.num_key_value_heads
    return (f"{args.num_hidden_layers} layers, {args.num_key_value_heads} KV heads x {args.head_dim}"
            + (f" (GQA {gqa}:1)" if gqa > 1 else ""))


def format_estimate(est, acc, what: str, chip=None) -> str:
    hw = f"{chip.name}: " if chip else ""
    hw += f"{est.bandwidth_gbps:g} GB/s" + (f", {est.peak_tflops:g} TFLOPS" if est.peak_tflops else
                                            ", peak TFLOPS unknown (pass --tflops)")
    lines = [
        f"model       {what}",
        f"hardware    {hw}",
        f"weights     {est.weight_bytes / 1e9:.2f} GB ({est.weight_bytes / 2**30:.2f} GiB)",
        f"KV cache    {est.kv_bytes / 1e6:.1f} MB at ctx {est.ctx} (fp16, {acc.kv_bytes_per_position} bytes per "
        f"position)",
        f"per token   {est.bytes_per_token / 1e9:.3f} GB read, {est.flops_per_token / 1e9:.2f} GFLOP (decode at "
        f"ctx {est.ctx})",
        f"tg          {est.tg_tps:.1f} t/s predicted (batch 1; bandwidth / bytes per token)",
    ]
    if est.pp_tps is not None:
        lines.append(f"{'pp' + str(est.n_prompt):<12}{est.pp_tps:.1f} t/s predicted ({est.pp_bound}-bound)")
        kv = "never (each sequence's KV reads outlast its FLOPs)" if math.isinf(est.crossover_batch_kv) else \
            f"at batch {est.crossover_batch_kv:.1f}"
        lines.append(f"crossover   decode turns compute-bound at batch {est.crossover_batch:.1f} "
                     f"(B* = peak * W / (2 * P * bw)); with the KV cache at ctx {est.ctx}: {kv}")
    else:
        lines.append("pp, crossover: need a peak (--tflops or a --chip with a known peak)")
    return "\n".join(lines)
