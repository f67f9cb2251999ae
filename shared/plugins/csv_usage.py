"""csv_usage: every usage record appended to a CSV file, one row per record, under a header.

Config (AIPROXY_PLUGIN_CSV_USAGE), a JSON object:

    path     the file (required); created with its folder and a header row when missing
    fields   the columns, a subset of FIELDS in any order (default: all of them)

Rows are written per batch, in a thread, with one `write()` under an exclusive file lock, so
several workers may append to one local file. The file is on the instance's disk: on Azure
Flex Consumption that is lost with the instance unless the path is on a mounted file share.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import threading
from pathlib import Path
from typing import Any

from shared.plugins import Plugin

FIELDS = (
    "time",
    "event_id",
    "attendee_id",
    "deployment",
    "resource_id",
    "model_class",
    "status",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "audio_tokens",
    "units",
    "model",
    "cost_nano",
    "unpriced",
    "price_source",
    "streamed",
    "estimated",
    "latency_ms",
    "local_date",
    "request_id",
)


class CsvUsage(Plugin):
    """Appends usage records to a CSV file."""

    attempts = 3  # a full disk or a file locked by a spreadsheet may free up
    keys = frozenset({"path", "fields"})

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("'path' names the CSV file to append to")
        fields = config.get("fields", list(FIELDS))
        if not isinstance(fields, list) or not fields or not set(fields) <= set(FIELDS):
            raise ValueError(f"'fields' is a list taken from {list(FIELDS)}")
        self.path = Path(path)
        self.fields = tuple(fields)
        self._lock = threading.Lock()  # a batch that outlived its budget may still be writing

    def on_usage(self, records: list[dict[str, Any]]) -> None:
        """Runs in a thread (a plain hook): file I/O never holds the event loop."""
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerows([record.get(field, "") for field in self.fields] for record in records)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                text = rows.getvalue()
                if os.fstat(fd).st_size == 0:
                    text = ",".join(self.fields) + "\n" + text
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
