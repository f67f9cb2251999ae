"""Memory handed back to the system after a burst.

Python keeps what it frees for reuse: small objects in its own arenas, larger ones (a usage
record's encoded batch part is about 700 bytes) in the C library's heap, which stays at its
high-water mark while free chunks sit between used ones. After a burst, such as usage records
held while storage was slow, a long-lived instance would keep that peak for good: measured in
`make bench`'s harness, 12k records held during a rollup left the dev host at 96 MiB instead
of 82, and a trim brought it back to 84. glibc's `malloc_trim(0)` returns the free pages; it
runs in a worker thread (ctypes lets go of the GIL), so requests are not held up. Where the C
library is not glibc, `trim` does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable
from typing import Any


def _glibc_trim() -> Callable[[int], Any] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _glibc_trim()


async def trim() -> bool:
    """Give free heap memory back to the system; False where that is not possible."""
    if _malloc_trim is None:
        return False
    await asyncio.get_running_loop().run_in_executor(None, _malloc_trim, 0)
    return True
