"""The dev host's app inside the test process, for tests that move the clock or stand in Entra."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from shared import settings
from tests.harness import EXAMPLE_SETTINGS, devhost_env


@contextmanager
def inprocess_app(storage: str, prefix: str, **overrides: str) -> Iterator[Any]:
    """The ASGI app with the tests' settings; the Functions app is indexed once per process."""
    from local.devhost import build

    env = devhost_env(storage, prefix, **overrides)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if name.startswith(("AIPROXY_", "AZURE_")):
                patch.setenv(name, value)
        settings.get.cache_clear()
        try:
            yield build(settings_file=EXAMPLE_SETTINGS)
        finally:
            settings.get.cache_clear()
