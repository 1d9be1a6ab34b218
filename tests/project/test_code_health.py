"""Structure the project keeps: no import cycles, no oversized source files, rooms importing one way.

Static checks over the source tree (no module is imported): every ``import`` of a
project module is an edge, wherever it sits (a function body or a ``__main__``
block still runs), except under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stadapter", "stadapter_api", "server", "clients", "export", "training", "bench")
GENERATED = ("stadapter_api/v1/",)
MAX_LINES = 450


def _sources() -> dict[str, Path]:
    """module name -> file, for every project module (generated stubs left out)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # `import a.b.c` of a name inside a module: the module
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import submodule`
                if f"{target}.{alias.name}" in known:
                    add(f"{target}.{alias.name}")
                else:
                    add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _sources()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_stadapter_imports_no_other_room():
    graph = import_graph()
    rooms = ("server", "clients", "export", "training", "bench")
    bad = sorted((m, d) for m, deps in graph.items() if m.split(".")[0] == "stadapter"
                 for d in deps if d.split(".")[0] in rooms)
    assert not bad, f"stadapter must stay pure; it imports {bad}"


def test_clients_import_only_the_generated_stubs_and_themselves():
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if m.split(".")[0] == "clients"
                 for d in deps if d.split(".")[0] not in ("clients", "stadapter_api")
                 and not (m == "clients.triton" and d.startswith("stadapter")))  # local decode for Triton
    assert not bad, f"clients import {bad}"


@pytest.mark.parametrize("pkg", PACKAGES + ("tests",))
def test_no_source_file_is_over_the_line_limit(pkg):
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / pkg).rglob("*.py")
            if not p.relative_to(ROOT).as_posix().startswith(GENERATED)
            and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    if pkg == "tests":  # test modules may grow larger, but not without bound
        long = {k: v for k, v in long.items() if v > 2 * MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def _sys_path_edits_and_test_imports(path: Path, test_modules: set[str]) -> list[str]:
    """``sys.path`` changes (``sys.path.insert(...)``, ``sys.path = ...``, ``site.addsitedir``) and imports of
    test modules in one source file, as ``line: what`` strings."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            found.append(f"{node.lineno}: uses sys.path")
        elif isinstance(node, ast.Attribute) and node.attr == "addsitedir":
            found.append(f"{node.lineno}: site.addsitedir")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in test_modules]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in test_modules:
            found.append(f"{node.lineno}: from {node.module} import ...")
    return sorted(found, key=lambda hit: int(hit.split(":")[0]))


def test_the_sys_path_check_sees_inserts_and_test_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.path.insert(0, 'tests')\nfrom media import make_clip\nimport serverproc as s\n"
                   "import site\nsite.addsitedir('tests')\nfrom stadapter.video.synthetic import make_clip\n")
    assert _sys_path_edits_and_test_imports(bad, {"media", "serverproc", "tests"}) == [
        "2: uses sys.path", "3: from media import ...", "4: import serverproc", "6: site.addsitedir"]


def test_no_room_edits_sys_path_or_imports_the_tests():
    """Benches and the rest run as ``python -m room.module`` from the checkout; what they share with the tests
    (clip makers, the server process) lives in the rooms (stadapter.video.synthetic, server.process)."""
    test_modules = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"tests"}
    bad = {path.relative_to(ROOT).as_posix(): hits for path in _sources().values()
           if (hits := _sys_path_edits_and_test_imports(path, test_modules))}
    assert not bad, f"sys.path edits or imports of tests/ modules: {bad}"


# Renames that are not atomic writes, each with its reason; every other file or folder is written through
# stadapter.fsutil (temp beside the target, fsync, one rename, fsync the folder).
RENAMES_ALLOWED = {
    "stadapter/fsutil.py": "the atomic-write helpers themselves",
    "server/registry/registry.py": "publishes an already fsynced upload folder; the rename fails when another replica took the version",
    "server/registry/folders.py": "moves a retired version aside (a tombstone) before it is deleted",
}


def _hand_renames(path: Path) -> list[int]:
    """Lines of ``os.replace`` / ``os.rename`` / ``shutil.move`` calls in one source file."""
    return sorted(node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name)
                  and (node.func.value.id, node.func.attr) in {("os", "replace"), ("os", "rename"), ("shutil", "move")})


def test_the_rename_finder_finds_renames(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import os, shutil\nos.replace('a', 'b')\n'a'.replace('a', 'b')\nos.rename('a', 'b')\n"
                   "shutil.move('a', 'b')\n")
    assert _hand_renames(src) == [2, 4, 5]


def test_files_are_published_through_fsutil_not_renamed_by_hand():
    found = {rel: lines for path in _sources().values()
             if (rel := path.relative_to(ROOT).as_posix()) not in RENAMES_ALLOWED and (lines := _hand_renames(path))}
    assert not found, f"hand-written renames (use stadapter.fsutil.atomic_file / atomic_dir / atomic_write_*): {found}"


def test_make_protos_regenerates_the_committed_stubs(tmp_path):
    """The generator is pinned (pyproject's dev extra), so ``make protos`` is a no-op on an unchanged proto;
    a drifted generator would rewrite the committed stubs (their version checks included)."""
    from stadapter_api.generate import generate

    generate(tmp_path)
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "stadapter_api/v1").glob("inference_pb2*"))
    assert len(committed) == 3
    for rel in committed:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), f"{rel} differs when regenerated"
