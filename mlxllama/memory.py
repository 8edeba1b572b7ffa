"""Process memory: handing freed heap pages back to the operating system."""

from __future__ import annotations

import ctypes
import gc
import sys


def return_freed_memory() -> None:
    """glibc keeps the pages of freed heap blocks (a loader's arrays, for one); malloc_trim returns them."""
    if not sys.platform.startswith("linux"):
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
