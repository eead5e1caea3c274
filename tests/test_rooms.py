"""The package's shape: five rooms and a seam at the top, every import pointing down.

Read from the source itself (every `import` and `from ... import` of every module, those
under `if TYPE_CHECKING:` included), so that a module that lands in the wrong room, or an
import that runs back up, fails here rather than in a reader's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moshi_engine"
VOCABULARY = {"audio", "conversation", "timings"}
ROOMS = {"model", "door", "wire", "page", "bench", "watch"}
# What each part may import from the package, besides itself. Leaves first.
MAY_IMPORT = {
    "vocabulary": set(),
    "watch": {"vocabulary"},  # metrics and logs: below the model, whose process logs alike
    "model": {"vocabulary", "watch"},
    "door": {"vocabulary"},
    "session": {"vocabulary", "watch", "model"},
    "engine": {"vocabulary", "watch", "model", "door", "session"},
    "wire": {"vocabulary", "watch", "model", "door", "session", "engine"},
    "page": {"vocabulary", "watch", "door", "session", "engine", "wire"},
    "client": {"vocabulary", "door", "wire"},
    "web": {"vocabulary", "watch", "model", "door", "session", "engine", "wire", "page"},
    "package": set(),  # moshi_engine/__init__.py
}
LEAVES = {"wire.protocol", "wire.codec"}  # bytes and Opus: nothing of the package but its vocabulary


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """Which part of the package a module belongs to: a room, the vocabulary, or a top module."""
    head = module.split(".")[0]
    if not module:
        return "package"
    if head in ROOMS:
        return head
    return "vocabulary" if head in VOCABULARY else head


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


class Imports(ast.NodeVisitor):
    """The package's modules that one module imports: (name, line, deferred) each."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.base = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[tuple[str, int, bool]] = []
        self.external: list[tuple[str, int]] = []
        self._depth = 0

    def _function(self, node) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def _target(self, name: str) -> str:
        """The package module `name` names (a module, or a package whose name is given)."""
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        return name

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "moshi_engine":
                self.found.append((self._target(alias.name.removeprefix("moshi_engine").lstrip(".")), node.lineno,
                                   self._depth > 0))
            else:
                self.external.append((alias.name, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            if (node.module or "").split(".")[0] != "moshi_engine":
                self.external.append((node.module or "", node.lineno))
                return
            base = node.module.removeprefix("moshi_engine").lstrip(".")
        else:
            parts = self.base.split(".") if self.base else []
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(part for part in [*parts, node.module or ""] if part)
        for alias in node.names:  # `from . import x` names modules
            candidate = ".".join(part for part in (base, alias.name) if part)
            target = candidate if candidate in self.known else self._target(base)
            self.found.append((target, node.lineno, self._depth > 0))


def imports_of(module: str, path: Path, known: set[str]) -> Imports:
    visitor = Imports(module, path.name == "__init__.py", known)
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor


@pytest.fixture(scope="module")
def graph() -> dict[str, Imports]:
    found = modules()
    return {module: imports_of(module, path, set(found)) for module, path in found.items()}


def test_at_most_eight_modules_stay_at_the_top():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()} == ROOMS


@pytest.mark.parametrize("room", sorted(ROOMS - {"bench"}))
def test_each_room_says_what_it_holds(room):
    assert ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))


def test_every_import_points_down(graph):
    wrong = []
    for module, found in graph.items():
        part = part_of(module)
        if part == "bench":
            continue  # the benchmark measures everything
        allowed = MAY_IMPORT[part] | {part}
        for target, line, _ in found.found:
            if part_of(target) not in allowed:
                wrong.append(f"{module}:{line} ({part}) imports {target} ({part_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_codec_and_the_protocol_are_leaves(graph):
    for leaf in LEAVES:
        assert {part_of(target) for target, _, _ in graph[leaf].found} <= {"vocabulary"}, leaf


def test_no_import_of_the_package_is_deferred_into_a_function(graph):
    deferred = [f"{module}:{line} imports {target}" for module, found in graph.items()
                if part_of(module) != "bench" for target, line, inside in found.found if inside]
    assert not deferred, "\n".join(deferred)


def test_no_module_imports_itself_back_through_others(graph):
    edges = {module: {target for target, _, _ in found.found if target != module} for module, found in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            loop = path[path.index(module):] + [module]
            raise AssertionError("import loop: " + " -> ".join(loop))
        if module in done:
            return
        for target in edges.get(module, ()):
            visit(target, [*path, module])
        done.add(module)

    for module in edges:
        visit(module, [])


def test_only_the_page_imports_gradio_and_fastrtc_and_nothing_imports_modal(graph):
    wrong = []
    for module, found in graph.items():
        for name, line in found.external:
            root = name.split(".")[0]
            if root == "modal" or (root in ("gradio", "fastrtc") and part_of(module) != "page"):
                wrong.append(f"{module}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)
