"""Layering (STYLE.md section 3), checked on every module the packages hold today: a new file
is covered the day it is added.

Three checks: (1) statically, every import a module makes anywhere (top level, inside
functions, ``importlib.import_module("literal")``) against its layer's forbidden list; (2) at
run time, each layer's modules imported with the frameworks it must not use made
unimportable, so an indirect import through a third-party package fails too; (3) no import
cycles between our modules (imports under ``if TYPE_CHECKING:`` excepted).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vannah_pipelines", "receiver", "dicomweb")

FRAMEWORKS_WEB = ("fastapi", "starlette", "uvicorn")
# Layer -> (module prefixes it holds, imports it must not make). Order matters: first match.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # Dagster's layer: its definitions, and the daemon entry point that tunes Dagster.
    "defs": (
        ("vannah_pipelines.defs", "vannah_pipelines.definitions",
         "vannah_pipelines.dagster_daemon"),
        ("receiver", "dicomweb", *FRAMEWORKS_WEB),
    ),
    "dimse": (
        ("vannah_pipelines.dimse",),
        ("dagster", "receiver", "dicomweb", "vannah_pipelines.defs", *FRAMEWORKS_WEB),
    ),
    # The command line and the platform supervisor: services run as child processes.
    "entry": (
        ("vannah_pipelines.cli", "vannah_pipelines.platform", "vannah_pipelines.dagster_home"),
        ("dagster", "pynetdicom", "receiver", "dicomweb", "vannah_pipelines.defs",
         "vannah_pipelines.definitions", *FRAMEWORKS_WEB),
    ),
    "pure": (
        ("vannah_pipelines",),  # everything else of the package: the framework-free layer
        ("dagster", "pynetdicom", "receiver", "dicomweb", "vannah_pipelines.defs",
         "vannah_pipelines.definitions", "vannah_pipelines.dimse", "vannah_pipelines.cli",
         "vannah_pipelines.platform", "vannah_pipelines.dagster_home",
         "vannah_pipelines.dagster_daemon", *FRAMEWORKS_WEB),
    ),
    "receiver": (
        ("receiver",),
        ("dagster", "dicomweb", "vannah_pipelines.defs", "vannah_pipelines.definitions",
         *FRAMEWORKS_WEB),
    ),
    "dicomweb": (
        ("dicomweb",),
        ("dagster", "pynetdicom", "receiver", "vannah_pipelines.defs",
         "vannah_pipelines.definitions", "vannah_pipelines.dimse"),
    ),
}  # fmt: skip
# Third-party frameworks made unimportable for the run-time check of each layer.
RUNTIME_BLOCKED = {
    layer: tuple(f for f in forbidden if f.split(".")[0] not in (*PACKAGES,))
    for layer, (_, forbidden) in LAYERS.items()
}


def discover() -> dict[str, Path]:
    """Every module of our packages: dotted name -> file."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = discover()


def layer_of(module: str) -> str:
    for layer, (prefixes, _) in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} belongs to no layer of STYLE.md section 3")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if MODULES[module].name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str) -> Iterator[tuple[str, bool]]:
    """(imported module, under TYPE_CHECKING) for every import `module` makes."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def visit(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    yield from visit_one(stmt, True)
                for stmt in child.orelse:
                    yield from visit_one(stmt, typing_only)
                continue
            yield from visit_one(child, typing_only)

    def visit_one(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, typing_only
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in MODULES else base), typing_only
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, typing_only
        yield from visit(node, typing_only)

    yield from visit(tree, False)


def _matches(name: str, prefix: str) -> bool:
    if prefix == "dagster":  # dagster and its integrations (dagster_aws, dagster_postgres...)
        return name.split(".")[0] == "dagster" or name.startswith("dagster_")
    return name == prefix or name.startswith(prefix + ".")


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 50
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_what_its_layer_allows(module: str) -> None:
    _, forbidden = LAYERS[layer_of(module)]
    bad = sorted({name for name, _ in imports_of(module) for f in forbidden if _matches(name, f)})
    assert not bad, f"{module} ({layer_of(module)} layer) imports {bad}"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_with_its_forbidden_frameworks_missing(layer: str) -> None:
    modules = sorted(m for m in MODULES if layer_of(m) == layer)
    if not modules:
        return  # a layer STYLE.md plans but the code has not grown yet (e.g. dimse)
    code = (
        "import importlib, sys, traceback\n"
        f"for name in {list(RUNTIME_BLOCKED[layer])!r}:\n"
        "    sys.modules[name] = None\n"
        "failed = []\n"
        f"for module in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "    except Exception:\n"
        "        failed.append(module + ': ' + traceback.format_exc(limit=3)[-600:])\n"
        "sys.exit('\\n'.join(failed) or None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_our_modules() -> None:
    graph = {
        module: {
            name
            for name, typing_only in imports_of(module)
            if not typing_only and name in MODULES and name != module
        }
        for module in MODULES
    }
    assert _cycles(graph) == []


def test_receiver_loads_the_catalog_stack_only_for_query_retrieve() -> None:
    """A receiver worker that only stores never imports DuckDB or pyarrow (~60 MiB each
    worker); the Q/R handlers bring them in on the first C-FIND / C-GET / C-MOVE."""
    code = (
        "import sys\n"
        "import receiver.app, receiver.fast_store\n"
        "assert 'duckdb' not in sys.modules and 'pyarrow' not in sys.modules, 'eager'\n"
        "import receiver.qr_handlers\n"
        "assert 'duckdb' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_receiver_imports_no_object_storage_client_until_a_tier_needs_one() -> None:
    """A store-only worker, and a Q/R worker reading the hot tier, never import the
    ``minio`` SDK or boto3; the worker's StorageTiers builds a backend (and imports its
    client) the first time its tier is read."""
    code = (
        "import sys, tempfile\n"
        "clients = ('minio', 'boto3', 'botocore')\n"
        "import receiver.app, receiver.fast_store\n"
        "import receiver.qr_handlers\n"
        "from receiver.archive import Archive\n"
        "from vannah_pipelines.settings import load_settings\n"
        "from vannah_pipelines.storage.base import Tier\n"
        "settings = load_settings(data_dir=tempfile.mkdtemp(), warm_storage='s3',\n"
        "    warm_s3_endpoint='127.0.0.1:9', cold_storage='s3-archive')\n"
        "tiers = Archive(settings).tiers\n"
        "tiers[Tier.HOT]\n"
        "assert not [c for c in clients if c in sys.modules], 'eager'\n"
        "tiers[Tier.WARM]\n"
        "assert 'minio' in sys.modules and 'boto3' not in sys.modules, 'warm'\n"
        "tiers[Tier.COLD]\n"
        "assert 'boto3' in sys.modules, 'cold'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# Services read an instance's bytes through StorageTiers only (STYLE.md section 3): they
# build no backend, name no tier folder and make no storage path themselves.
SERVICE_PACKAGES = ("dicomweb", "receiver")
STORAGE_FORBIDDEN_NAMES = frozenset(
    {
        "LocalStorage",
        "MinioStorage",
        "ArchiveStorage",
        "build_backend",
        "open_landed",
        "landed_path",
        "instance_key",
        "hot_dir",
        "warm_dir",
        "cold_dir",
    }
)
STORAGE_FORBIDDEN_MODULES = (
    "vannah_pipelines.storage.local",
    "vannah_pipelines.storage.s3",
    "vannah_pipelines.storage.archive",
)


def storage_bypasses(source: str) -> list[str]:
    """What in `source` reads storage other than through StorageTiers: a backend class, a
    tier folder setting, a storage-path builder, or an import of a backend module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.alias):
            name = node.name.rsplit(".", 1)[-1]
            if any(_matches(node.name, m) for m in STORAGE_FORBIDDEN_MODULES):
                found.append(f"line {getattr(node, 'lineno', '?')}: imports {node.name}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = node.name
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and any(_matches(node.module, m) for m in STORAGE_FORBIDDEN_MODULES)
        ):
            found.append(f"line {node.lineno}: imports from {node.module}")
        if name in STORAGE_FORBIDDEN_NAMES:
            found.append(f"line {getattr(node, 'lineno', '?')}: {name}")
    return found


def test_storage_bypass_finder_finds_each_kind() -> None:
    source = (
        "from vannah_pipelines.storage.local import LocalStorage\n"
        "import vannah_pipelines.storage.s3\n"
        "def landed_path(archive): ...\n"
        "store = LocalStorage(settings.hot_dir)\n"
        "key = instance_key(a, b, c, d)\n"
        "tiers.open_instance(row)\n"
    )
    found = storage_bypasses(source)
    for what in ("vannah_pipelines.storage.local", "vannah_pipelines.storage.s3", "landed_path"):
        assert any(what in f for f in found), (what, found)
    for what in ("LocalStorage", "hot_dir", "instance_key"):
        assert any(f.endswith(what) for f in found), (what, found)
    assert storage_bypasses("tiers = StorageTiers(settings)\ntiers.open_instance(row)\n") == []


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.split(".")[0] in SERVICE_PACKAGES)
)
def test_services_read_instance_bytes_through_storage_tiers_only(module: str) -> None:
    found = storage_bypasses(MODULES[module].read_text(encoding="utf-8"))
    assert not found, f"{module} reads storage around StorageTiers: {found}"


def test_each_service_holds_one_storage_tiers() -> None:
    """DICOMweb keeps its StorageTiers on the app state, a receiver worker on its Archive."""
    for module, holder in (("dicomweb.app", "app.state.tiers"), ("receiver.archive", "_tiers")):
        source = MODULES[module].read_text(encoding="utf-8")
        assert "StorageTiers(" in source and holder in source, module
