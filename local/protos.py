"""The Functions host protocol's generated modules, loaded under a private name.

PyPI ships the generated `FunctionRpc_pb2` modules (and the `identity/` and `shared/` modules
they import) only inside `azure-functions-runtime-v1`, under a stray top-level `tests/protos/`
package. Installing that wheel would put a foreign `tests` package into the virtualenv, so
`make setup` downloads the pinned wheel (requirements-protos.txt, hash-checked) and
`python -m local.protos install WHEEL_DIR` extracts only `tests/protos/` into
`<venv>/aiproxy-protos/`. This module imports them from there as `aiproxy_rpc`: the generated
files import each other relatively, so the package name is ours to choose.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import types
import zipfile
from functools import cache
from pathlib import Path

PACKAGE = "aiproxy_rpc"
WHEEL_GLOB = "azure_functions_runtime_v1-*.whl"
INSIDE_WHEEL = "tests/protos/"


def default_location() -> Path:
    return Path(sys.prefix) / "aiproxy-protos"


def install(wheel_dir: Path, target: Path | None = None) -> Path:
    """Extract the generated modules from the downloaded wheel into `target`."""
    wheels = sorted(wheel_dir.glob(WHEEL_GLOB))
    if not wheels:
        raise SystemExit(f"no {WHEEL_GLOB} in {wheel_dir}: run `make setup`")
    target = target or default_location()
    if target.exists():
        shutil.rmtree(target)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if not name.startswith(INSIDE_WHEEL) or not name.endswith(".py"):
                continue
            out = target / name.removeprefix(INSIDE_WHEEL)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(wheel.read(name))
    return target


@cache
def load(location: Path | None = None) -> types.ModuleType:
    """Every message, enum and the stubs of the protocol, as one module (what the runtime's
    entry points expect in `properties["protos"]`)."""
    location = location or default_location()
    init = location / "__init__.py"
    if not init.exists():
        raise RuntimeError(
            f"the Functions protocol modules are missing ({location}): run `make setup`"
        )
    spec = importlib.util.spec_from_file_location(
        PACKAGE, init, submodule_search_locations=[str(location)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    rpc = importlib.import_module(f"{PACKAGE}.FunctionRpc_pb2")
    stubs = importlib.import_module(f"{PACKAGE}.FunctionRpc_pb2_grpc")
    nullable = importlib.import_module(f"{PACKAGE}.shared.NullableTypes_pb2")
    identity = importlib.import_module(f"{PACKAGE}.identity.ClaimsIdentityRpc_pb2")
    protos = types.ModuleType(f"{PACKAGE}.all")
    for module in (identity, nullable, rpc, stubs):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(protos, name, getattr(module, name))
    return protos


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "install":
        raise SystemExit("usage: python -m local.protos install WHEEL_DIR")
    print(f"protocol modules in {install(Path(sys.argv[2]))}")
