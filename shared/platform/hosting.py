"""What the app does for the Functions Python worker runtime it runs in.

`azure-functions-runtime` 1.3.0 keeps an entry per HTTP invocation in its HTTP coordinator and
never removes it: about 2 KiB a call, 1 GB after some 450k calls in one worker. The app drops
the entries of invocations the runtime has finished with (request and response both handed
over), every few seconds. Only the coordinator's table is private; what marks an entry done is
its public state. Where the runtime is absent or changes shape, this does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

PRUNE_SECONDS = 5.0


def _references() -> dict[str, Any] | None:
    try:
        from azure_functions_runtime.http_v2 import http_coordinator
    except ImportError:
        return None
    references = getattr(http_coordinator, "_context_references", None)
    return references if isinstance(references, dict) else None


def _finished(reference: Any) -> bool:
    try:
        return (
            reference.http_request_available_event.is_set()
            and reference.http_response_available_event.is_set()
            and reference.http_request is None
            and reference.http_response is None
        )
    except AttributeError:
        return False


def prune_finished_invocations() -> int:
    """Drop the runtime's entries for invocations that are over; how many went."""
    references = _references()
    if not references:
        return 0
    done = [key for key, reference in list(references.items()) if _finished(reference)]
    for key in done:
        references.pop(key, None)
    return len(done)


def open_invocations() -> int:
    """Entries the runtime holds now (finished ones not yet pruned included)."""
    references = _references()
    return len(references) if references is not None else 0


async def keep_pruning(every: float = PRUNE_SECONDS) -> None:
    """The pruning loop of a worker process (one per runtime)."""
    if _references() is None:
        return
    while True:
        await asyncio.sleep(every)
        try:
            prune_finished_invocations()
        except Exception:  # never let housekeeping take the worker down
            log.exception("pruning the runtime's finished invocations failed")
