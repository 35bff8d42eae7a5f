"""The import structure, read from the source (ast): imports run one way, and the union semantics
(``unionfs/fs``) know nothing of FUSE or of the image tool.

Every import counts, also one inside a function: a lazy import is a dependency all the same.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "unionfs"

# What the union semantics must never import: the FUSE binding and its loop, our adapter, and the
# layers above (images, containers, registries, builds, the command line).
FS_FORBIDDEN = ("pyfuse3", "trio", "unionfs.fuse", "unionfs.image", "unionfs.container",
                "unionfs.registry", "unionfs.build", "unionfs.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules ``name`` imports: absolute names, ``from X import Y`` naming module X.Y where Y is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among our own modules (a package's ``__init__`` aside), or None."""
    edges = {m: {t for t in ts if t in graph and t != m and not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_reader_sees_the_imports():
    """The graph is read right: known edges show (relative, absolute and ``from . import``)."""
    g = _graph()
    assert "unionfs.fs.sys" in g["unionfs.fs.union"]            # from . import sys as ovl
    assert "unionfs.fs.union" in g["unionfs.fuse.operations"]    # from ..fs.union import ...
    assert "pyfuse3" in g["unionfs.fuse.operations"]
    assert "unionfs.errors" in g["unionfs.fs.upper"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert _cycle(_graph()) is None


def test_fs_and_fuse_have_no_cycle_at_all():
    g = _graph()
    assert _cycle({m: ts for m, ts in g.items() if m.startswith(("unionfs.fs", "unionfs.fuse"))}) is None


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.startswith("unionfs.fs")))
def test_fs_knows_no_fuse_nor_the_layers_above(module):
    bad = sorted(t for t in _graph()[module] if t.startswith(FS_FORBIDDEN) and (
        t in FS_FORBIDDEN or t.startswith(tuple(f + "." for f in FS_FORBIDDEN))))
    assert not bad, f"{module} imports {bad}"
