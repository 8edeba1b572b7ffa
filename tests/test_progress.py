"""Progress on long work: stream_generate's prefill_progress callback and the CLI's bar, which shows only on a
terminal and only for long prompts."""

from __future__ import annotations

import mlxllama
from mlxllama.generate import stream_generate
from mlxllama_cli.app import PREFILL_PROGRESS_MIN_TOKENS, PrefillProgress


def test_prefill_progress_reports_each_chunk(tiny_hf):
    model, tok = mlxllama.load(str(tiny_hf), backend="numpy")
    ids = list(range(3, 40))
    calls = []
    out = list(stream_generate(model, tok, ids, max_tokens=2, prefill_step_size=8,
                               prefill_progress=lambda done, total: calls.append((done, total))))
    assert calls[0] == (0, len(ids))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (len(ids) - 1, len(ids))
    assert len(calls) == 1 + -(-(len(ids) - 1) // 8)  # before, then after each chunk of 8
    plain = list(stream_generate(model, tok, ids, max_tokens=2, prefill_step_size=8))
    assert [r.token for r in out] == [r.token for r in plain]  # the callback changes nothing else


def test_prefill_bar_stays_off_when_not_a_terminal_or_short(capsys):
    bar = PrefillProgress()
    bar(0, PREFILL_PROGRESS_MIN_TOKENS * 4)  # pytest's stderr is not a terminal
    assert bar.bar is False
    short = PrefillProgress()
    short(0, 10)
    assert short.bar is False
    bar.close()
    assert capsys.readouterr().err == ""
