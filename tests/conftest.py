"""Session-wide real servers: one Azurite, one simulated upstream, one dev host."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from local.azurite import Azurite, free_port  # noqa: E402
from tests.entra_issuer import LocalIssuer  # noqa: E402
from tests.harness import (  # noqa: E402
    AppHost,
    EventSetup,
    Simulator,
    Storage,
    host_env,
    unique_prefix,
)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    server = Azurite(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    """A local Entra ID stand-in (OpenID configuration and signing keys) for a module's tokens."""
    server = LocalIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim(log_dir: Path) -> Iterator[Simulator]:
    server = Simulator(log_dir, name="main")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefix() -> str:
    return unique_prefix("main")


@pytest.fixture(scope="session")
def host(azurite: Azurite, log_dir: Path, prefix: str) -> Iterator[AppHost]:
    server = AppHost(log_dir, host_env(azurite.connection_string, prefix))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def storage(azurite: Azurite, prefix: str) -> Storage:
    return Storage(azurite.connection_string, prefix)


@pytest.fixture
def event(host: AppHost, sim: Simulator) -> EventSetup:
    """A fresh live event with chat, completions and embeddings on the simulator."""
    return EventSetup(host, sim)
