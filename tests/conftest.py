"""Session-wide real servers: one Azurite, one simulated upstream, the app in two tiers.

`host` is the app with the test settings: served from this process (tests/inprocess.py) for a
module of the fast tier, through the host stand-in and its worker process (`AppHost`) for a
module marked `e2e`. `pytest -m "not e2e"` runs the fast tier alone.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A run starts a hundred or so Python processes (pytest-xdist's workers, app hosts and their
# workers, simulators) that import the same modules. Where the environment turns writing
# bytecode off (PYTHONDONTWRITEBYTECODE), each one would compile them again (pip compiled the
# installed packages, but the project's modules have no bytecode yet), and pytest would rewrite
# the asserts of every module of its plugins' packages (hypothesis, schemathesis: some 300)
# again in each of its processes, about 1.5 CPU-seconds each. So the run writes bytecode, for
# this process from here on and for every process it starts: into the `__pycache__` folders
# git ignores, where the installed packages' bytecode already is.
if sys.dont_write_bytecode:
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False

from local.azurite import Azurite, free_port  # noqa: E402
from tests.entra_issuer import LocalIssuer  # noqa: E402
from tests.harness import (  # noqa: E402
    E2E,
    App,
    AppHost,
    ClientAddress,
    EventSetup,
    Simulator,
    SpillRoot,
    Storage,
    host_env,
    unique_prefix,
)
from tests.inprocess import Configured, InProcessHost  # noqa: E402

_modules_seen = [0]


@pytest.fixture(scope="module", autouse=True)
def client_address() -> Iterator[str]:
    """Each module calls the hosts from a loopback address of its own (harness.ClientAddress):
    one module's wrong keys do not slow the next one's calls on a host they share."""
    _modules_seen[0] += 1
    address = f"127.0.2.{_modules_seen[0] % 250 + 1}"
    ClientAddress.move_to(address)
    yield address


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium for the module's page tests (tests/browser.py)."""
    from tests.browser import for_tests

    with for_tests() as launched:
        yield launched


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session", autouse=True)
def spill_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The apps' usage journals under pytest's temporary folder (harness.SpillRoot)."""
    SpillRoot.path = tmp_path_factory.mktemp("spill")
    return SpillRoot.path


# In a parallel run one Azurite serves every test process (each has its own table prefix and
# queue names): the run's first process starts it while the test processes start and collect,
# instead of each waiting for one of its own (node loads each service for seconds). Its table
# service logs each request it serves (tests count the reads of their own tables).
SHARED_AZURITE = "aiproxy_azurite"
_STARTED = pytest.StashKey[Azurite]()


def _logging_azurite() -> Azurite:
    folder = Path(tempfile.mkdtemp(prefix="aiproxy-azurite-"))
    return Azurite(free_port(), access_log=folder / "access.log")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, never called
def pytest_configure_node(node: Any) -> None:
    """The shared Azurite's ports and access log, to each test process of a parallel run."""
    stash = node.config.stash
    if _STARTED not in stash:
        stash[_STARTED] = _logging_azurite().launch()
    shared = stash[_STARTED]
    node.workerinput[SHARED_AZURITE] = f"{shared.port},{shared.queue_port},{shared.access_log}"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _STARTED in config.stash:
        shared = config.stash[_STARTED]
        shared.stop()
        shutil.rmtree(Path(str(shared.access_log)).parent, ignore_errors=True)


@pytest.fixture(scope="session")
def azurite(request: pytest.FixtureRequest) -> Iterator[Azurite]:
    """The run's Azurite: the shared one in a parallel run, else one of this process's own
    (`access_log`: the table service's line for each request, as it answers)."""
    shared = getattr(request.config, "workerinput", {}).get(SHARED_AZURITE)
    if shared:
        port, queue_port, log = shared.split(",", 2)
        yield Azurite(int(port), queue_port=int(queue_port), access_log=Path(log)).ready(60)
        return
    server = _logging_azurite().start()
    yield server
    server.stop()
    shutil.rmtree(Path(str(server.access_log)).parent, ignore_errors=True)


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
def app_host(azurite: Azurite, log_dir: Path, prefix: str) -> Iterator[AppHost]:
    """The app through the host stand-in and the worker runtime in its own process."""
    server = AppHost(log_dir, host_env(azurite.connection_string, prefix))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def second_host(azurite: Azurite, log_dir: Path, prefix: str) -> Iterator[AppHost]:
    """Another instance of the app on the same storage (and so the same keys), in a process of
    its own: with `host`, two instances, whichever tier `host` is in. Shared by the modules of
    a test process like `app_host` (each module's events and keys are its own): no module
    stops it or changes its settings."""
    server = AppHost(log_dir, host_env(azurite.connection_string, prefix), name="second")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def inprocess(azurite: Azurite, prefix: str) -> Iterator[InProcessHost]:
    """The app's functions served from this process (one configuration live at a time)."""
    server = InProcessHost(host_env(azurite.connection_string, prefix))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest) -> App:
    """The app with the test settings, in the tier of the module: end to end when it is
    marked `e2e`, in this process otherwise."""
    if request.node.get_closest_marker(E2E) is not None:
        return request.getfixturevalue("app_host")
    return request.getfixturevalue("inprocess")


@pytest.fixture(scope="module")
def app_hosts(azurite: Azurite, log_dir: Path, prefix: str) -> Iterator[Callable[..., AppHost]]:
    """AppHosts with settings of their own, `app_hosts("name", AIPROXY_X="1")` (`prefix=` for
    tables of their own), each started at once and stopped when the module ends."""
    started: list[AppHost] = []

    def start(name: str = "host", **overrides: str) -> AppHost:
        env = host_env(azurite.connection_string, overrides.pop("prefix", prefix), **overrides)
        started.append(AppHost(log_dir, env, name=name))
        return started[-1]

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture(scope="session")
def storage(azurite: Azurite, prefix: str) -> Storage:
    return Storage(azurite.connection_string, prefix)


@pytest.fixture(scope="module")
def configured(
    request: pytest.FixtureRequest, azurite: Azurite, prefix: str
) -> Iterator[Configured]:
    """Hosts with settings of the module's own (see `Configured`)."""
    made = Configured(request, azurite.connection_string, prefix)
    yield made
    made.close()


@pytest.fixture
def event(request: pytest.FixtureRequest, host: App, sim: Simulator) -> EventSetup:
    """A fresh live event with chat, completions and embeddings on the simulator, made through
    `host`, or through `app_host` for a test marked `e2e` in a module of the fast tier."""
    if request.node.get_closest_marker(E2E) is not None:
        return EventSetup(request.getfixturevalue("app_host"), sim)
    return EventSetup(host, sim)


# Modules whose tests a parallel run may spread over its workers (each worker that runs one of
# them sets the module's fixtures up for itself): independent tests that take long.
SPREAD = ("test_schemathesis.py",)
# The modules that take longest, longest first: a parallel run starts them first, so that none
# of them is left running alone at the end (the other modules follow in their usual order).
LONGEST_FIRST = (
    "test_pages.py",
    "test_schemathesis.py",
    "test_realtime_metering.py",
    "test_make_run.py",
    "test_mcp.py",
    "test_call_journal.py",
    "test_pages_voice.py",
    "test_host_queues.py",
    "test_fair_share.py",
    "test_pools.py",
    "test_cli.py",
    "test_storage_outage.py",
    "test_rate_limits.py",
    "test_hardening.py",
    "test_caps.py",
    "test_responses.py",
    "test_worker_stop.py",
    "test_host.py",
    "test_upstream_endpoints.py",
    "test_registration_trust.py",
    "test_plugins.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that drives the browser is marked so (`-m "not browser"` leaves them out). In a
    worker of a parallel run, the longest modules come first."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
    if hasattr(config, "workerinput"):
        rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """A parallel run (pytest-xdist, `make test`: `-n 4`; docs/local.md#the-tests) hands each
    worker process whole modules, in collection order: a module's tests run in their order on
    one worker, with its module fixtures and the in-process host's one live configuration.
    Only the tests of a module in `SPREAD` go one by one."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return nodeid if module.rsplit("/", 1)[-1] in SPREAD else module

    config.option.loadscopereorder = False  # the collection's order: the longest first
    return ByModule(config, log)
