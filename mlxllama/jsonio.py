"""JSON files that may be hostile (config.json, tokenizer files, submissions): size-limited, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError


def read_json(path: str | Path, error=ConfigError, max_bytes: int = 1 << 20, what: str = "file") -> Any:
    """Parse a JSON file; every failure is one line of `error` naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes >> 20} MiB")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
