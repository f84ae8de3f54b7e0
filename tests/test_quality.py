"""Gates that keep the code base honest: lint, format, strict types, a complete public API."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import threading
import types
from pathlib import Path

import anyio
import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ["breadasync", "breadasync.emulator", "breadasync.export"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.timeout(600)
def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", "src", "tests", "benchmarks", "examples")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.timeout(600)
def test_mypy_strict() -> None:
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_sorted_complete_and_documented(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    assert exported == sorted(exported, key=lambda n: (not n.isupper(), n[:1].islower(), n))
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
    }
    assert public - {"__version__"} <= set(exported), public - set(exported)
    # A name loaded on first use is public too.
    assert set(getattr(module, "_LAZY", {})) <= set(exported)
    for export in exported:
        value = getattr(module, export)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name}.{export} has no docstring"


# --- the shape of the package: one direction of dependency, no reaching into privates ----

SRC = ROOT / "src" / "breadasync"
MAX_LINES = 550
"""About 500 lines: a module over this says at its top why it is not split."""
PENDING_SPLITS: set[str] = set()
"""Modules over the bound that are being cut at their seams (none now: the exporter was split
into ``_options``, ``_exporter``, ``_many`` and ``_stream``); each leaves this set when it is
under the bound or says why at its top."""


def _modules() -> dict[str, tuple[Path, list[str]]]:
    """Dotted module name -> (file, the package it resolves relative imports against)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(inner) for inner in ast.walk(node))
    return hidden


def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    """Who imports whom inside the package, imports inside functions included (they run
    too), those under ``if TYPE_CHECKING:`` only when asked."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hidden = set() if type_checking else _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
                deps.update(c for c in candidates if c in modules and c != name)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules and a.name != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycles_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_runtime_import_cycle() -> None:
    graph = import_graph()
    assert "breadasync._api" in graph["breadasync._fanout"]  # the graph sees real edges
    assert cycles(graph) == []


def test_dependencies_point_away_from_the_facade() -> None:
    graph = import_graph(type_checking=True)
    facade = "breadasync._client"
    users = sorted(name for name, deps in graph.items() if facade in deps)
    # Only the package's front door and the CLI may use the facade; engines, resources,
    # the exporter and the API layer sit below it.
    above = ("breadasync.cli", "breadasync.ray")  # front ends built on the client
    front = {"breadasync"} | {name for name in graph if name.startswith(above)}
    assert set(users) <= front, users
    below = ["breadasync._api", "breadasync._fanout", "breadasync._resources"]
    below += [name for name in graph if name.startswith("breadasync.export")]
    for name in below:
        assert facade not in graph[name], name
    api_deps = graph["breadasync._api"]
    assert not {"breadasync._fanout", "breadasync._resources"} & api_deps


def _is_private(name: str) -> bool:
    dunder = name.startswith("__") and name.endswith("__")
    sunder = name.startswith("_") and name.endswith("_") and not dunder  # enum's _name_
    return name.startswith("_") and not dunder and not sunder


FOREIGN_PRIVATE = {"session._retry_connection"}
"""Private members of other libraries we must touch, each with its reason at the use:
aiohttp has no public switch for its silent re-send of a GET (see _aiohttp_transport)."""


def test_no_module_reaches_into_another_objects_private_members() -> None:
    reached = []
    for path, _ in _modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if ast.unparse(node) in FOREIGN_PRIVATE:
                    continue
                reached.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                reached.extend(
                    f"{path.relative_to(SRC)}:{node.lineno}: imports {alias.name}"
                    for alias in node.names
                    if _is_private(alias.name)
                )
    assert reached == []


def test_every_module_says_what_it_owns_and_stays_small() -> None:
    too_long = []
    for path, _ in _modules().values():
        text = path.read_text(encoding="utf-8")
        relative = path.relative_to(SRC).as_posix()
        assert ast.get_docstring(ast.parse(text)), f"{relative} has no module docstring"
        lines = len(text.splitlines())
        says_why = "Why it is long:" in (ast.get_docstring(ast.parse(text)) or "")
        if lines > MAX_LINES and relative not in PENDING_SPLITS and not says_why:
            too_long.append(f"{relative}: {lines} lines")
    assert too_long == []


def _in_fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter (where nothing is imported yet)."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_decoding_child_imports_the_decoder_without_the_client() -> None:
    """The child's start-up delays every export that uses one; the client (and aiohttp
    behind it) took 0.14 s of it before the package's names loaded on first use."""
    loaded = _in_fresh_python(
        "import sys, breadasync.export._decode_child\n"
        "print(','.join(sorted(m for m in ('aiohttp', 'breadasync._client', "
        "'breadasync.export._exporter', 'pyarrow.fs') if m in sys.modules)))\n"
        "from breadasync import BreadClient\n"
        "from breadasync.export import SCHEMA, ExportResult\n"
        "assert BreadClient.__module__ == 'breadasync._client' and SCHEMA and ExportResult\n"
    )
    assert loaded == ""


def test_an_unknown_name_of_the_package_is_an_attribute_error() -> None:
    import breadasync
    import breadasync.export

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = breadasync.Nope  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = breadasync.export.Nope  # type: ignore[attr-defined]
    assert {"BreadClient", "ExportResult"} <= set(dir(breadasync))
    assert {"SCHEMA", "DecodeProcesses"} <= set(dir(breadasync.export))


def test_import_breadasync_loads_neither_pyarrow_nor_rich() -> None:
    heavy = _in_fresh_python(
        "import sys, breadasync\n"
        "heavy = sorted(m for m in ('pyarrow', 'rich') if m in sys.modules)\n"
        "assert breadasync.BreadClient and breadasync.__version__\n"
        "print(','.join(heavy))\n"
        "breadasync.ExportResult  # a lazy name still resolves, and then pyarrow is there\n"
        "assert 'pyarrow' in sys.modules\n"
    )
    assert heavy == ""


FIRST_EXPORT = """
import asyncio, json, sys, tempfile, threading

class Watch:
    threads = set()

    def find_spec(self, name, path=None, target=None):
        if name == "pyarrow":
            self.threads.add(threading.current_thread() is threading.main_thread())
        return None

sys.meta_path.insert(0, Watch())
from breadasync import BreadClient, MockTransport, TransportResponse

ROWS = [{"response": "a"}, {"response": "b"}]

async def answer(request):
    body = {"status": "complete", "lines": 2, "job_id": 1}
    if "/output" in request.url:
        body |= {"offset": 0, "limit": 2, "has_more": False, "output": ROWS}
    return TransportResponse(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

async def main():
    transport = MockTransport(answer)
    async with BreadClient("k" * 16, "https://bread.test", transport=transport) as client:
        with tempfile.TemporaryDirectory() as folder:
            result = await client.export_rollout("t", repo_name="r", dest=folder,
                                                 decode_processes=0)
    assert result.rows == 2

asyncio.run(main())
print(sorted(Watch.threads))
"""


FIRST_STREAM = FIRST_EXPORT.replace(
    """        with tempfile.TemporaryDirectory() as folder:
            result = await client.export_rollout("t", repo_name="r", dest=folder,
                                                 decode_processes=0)
    assert result.rows == 2
""",
    """        async with client.iter_rollout_batches("t", repo_name="r") as batches:
            rows = [batch.num_rows async for batch in batches]
    assert rows == [2]
""",
)


@pytest.mark.parametrize("script", [FIRST_EXPORT, FIRST_STREAM], ids=["export", "stream"])
def test_the_first_export_loads_pyarrow_off_the_event_loop(script: str) -> None:
    """Importing pyarrow and the exporter takes 0.2-0.7 s: in a worker thread, so a web
    backend's first export (or stream of batches) does not hold its event loop that long."""
    assert script != FIRST_EXPORT or "export_rollout" in script
    assert script != FIRST_STREAM or "iter_rollout_batches" in script
    assert _in_fresh_python(script) == "[False]"


async def test_an_export_started_while_the_exporter_loads_waits_for_it_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A module is in ``sys.modules`` from the moment its import begins: a second export
    started then must not take that as loaded, and import it (waiting on the first
    import's lock) on the event loop. The import here is a stand-in held open by a test."""
    from breadasync import _client

    name = "breadasync_exporter_stand_in"
    release = threading.Event()
    in_main_thread: list[bool] = []

    def slow_import(module: str) -> None:
        assert module == name
        sys.modules.setdefault(name, types.ModuleType(name))  # as an import in progress
        in_main_thread.append(threading.current_thread() is threading.main_thread())
        release.wait()

    monkeypatch.setattr(_client, "_EXPORTER", name)
    monkeypatch.setattr(_client, "_EXPORTER_LOADED", threading.Event())
    monkeypatch.setattr(_client, "importlib", types.SimpleNamespace(import_module=slow_import))
    monkeypatch.delitem(sys.modules, name, raising=False)
    done: list[str] = []

    async def load(label: str) -> None:
        await _client._load_exporter()
        done.append(label)

    try:
        async with anyio.create_task_group() as tg:
            try:
                tg.start_soon(load, "first")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(load, "second")
                await anyio.wait_all_tasks_blocked()
                assert done == []  # neither took the import in progress as done
            finally:
                release.set()  # the imports' threads cannot be cancelled: let them end
    finally:
        sys.modules.pop(name, None)
    assert sorted(done) == ["first", "second"]
    assert in_main_thread == [False, False]  # both imports ran in worker threads
