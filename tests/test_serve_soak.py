"""benchmarks/serve_soak.py, briefly, against a tiny random model: the soak's own machinery (the server as a
subprocess, good, dropped, abandoned and hostile requests, /metrics at 10 Hz, SIGTERM with 4 in flight) and the
checks that do not depend on the model's size or answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_hf_folder
from test_serve import with_template

ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_holds(sp_dir, tmp_path):
    # a context long enough for the soak's chats and its requests without max_tokens
    folder = with_template(make_hf_folder(tmp_path / "tiny", tokenizer_dir=sp_dir, max_position_embeddings=2048))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_soak.py"), "--model", str(folder),
                        "--backend", "numpy", "--seconds", "5", "--threads", "6", "--warmup", "2",
                        "--prefix-cache-mib", "16"], capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    for check in ("no 5xx", "no failed good request", "every hostile request a 4xx with OpenAI's error body",
                  "no failed /metrics scrape", "SIGTERM: 4 in flight finished, exit 0, no traceback"):
        assert f"ok   {check}" in out, out
    rows = dict(line.strip("|").split("|")[:2] for line in out.splitlines() if line.startswith("| ") and
                line.count("|") == 3)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    good_ok = int(rows["good requests ok / failed"].split(" / ")[0])
    hostile_ok = int(rows["hostile requests 4xx+OpenAI body / not"].split(" / ")[0])
    assert good_ok > 0 and hostile_ok > 0 and int(rows["streams dropped after two chunks"]) > 0, out
