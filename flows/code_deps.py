"""Which source files a stage runs: the import closure of the stage's wiring in flows/stages.py.

A stage's code deps are derived, never listed by hand: starting from the names a stage function in
flows/stages.py uses, every module they come from is followed through its imports (module-level and
function-level, so lazy imports count) while it stays inside a first-party package. Each module is
resolved to the file Python would import (`importlib.util.find_spec(...).origin`, i.e. its `__file__`),
so the hashed code is the code that runs: this checkout, an editable install, or site-packages. Only
`.py` sources are returned (never `__pycache__`); packages' `__init__.py` files are included because
importing a submodule runs them. Imports under `if TYPE_CHECKING:` and names used only in annotations run
nothing, so they are not followed: stage code names the root `Params` that way, and its deps stay the
sections it reads (core/config/<section>.py), not the server's.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path

# Tuneline's own packages; a user's modules (named in params) are followed within their own top package.
FIRST_PARTY = ("tuneline",)
WIRING_MODULE = "tuneline.flows.stages"


@cache
def module_file(name: str) -> Path | None:
    """The .py file `import name` would run, or None for a module that has no source file or does not exist."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).resolve()


def _is_package(name: str) -> bool:
    path = module_file(name)
    return path is not None and path.name == "__init__.py"


def _absolute(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if _is_package(module) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@cache
def imports_of(module: str) -> frozenset[tuple[str, tuple[str, ...]]]:
    """Every import in `module`'s source, anywhere in it: (module, names imported from it) pairs."""
    path = module_file(module)
    if path is None:
        return frozenset()
    found: set[tuple[str, tuple[str, ...]]] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add((_absolute(node, module), tuple(alias.name for alias in node.names)))
    return frozenset(found)


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`: a block that never runs."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` that can run: `if TYPE_CHECKING:` bodies and annotations are left out."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns"):  # argument/variable annotations, return annotations
                continue
            if isinstance(value, ast.AST):
                todo.append(value)
            elif isinstance(value, list):
                todo.extend(item for item in value if isinstance(item, ast.AST))


def _imported_modules(base: str, names: tuple[str, ...]) -> list[str]:
    """`from base import a, b`: base, plus base.a / base.b where those are submodules (not attributes)."""
    if not _is_package(base):
        return [base]
    return [base, *(f"{base}.{name}" for name in names if module_file(f"{base}.{name}"))]


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_closure(roots: Iterable[str], packages: Iterable[str] = FIRST_PARTY) -> set[str]:
    """`roots` and every module they import, transitively, that lies in one of `packages` (top-level names)."""
    allowed = set(packages) | {root.split(".")[0] for root in roots}
    seen: set[str] = set()
    todo = [name for root in roots for name in (*_parents(root), root)]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in allowed or module_file(name) is None:
            continue
        seen.add(name)
        for base, names in imports_of(name):
            if base.split(".")[0] in allowed:  # never resolve third-party modules: that would import them
                todo.extend(_imported_modules(base, names))
        todo.extend(_parents(name))
    return seen


def stage_entry_modules(stage: str) -> set[str]:
    """The modules the stage's function in flows/stages.py draws on (following the module's own helpers)."""
    path = module_file(WIRING_MODULE)
    tree = ast.parse(path.read_text(), filename=str(path))
    imported: dict[str, str] = {}
    for node in (n for n in tree.body if not _is_type_checking(n)):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, WIRING_MODULE)
            if base.split(".")[0] not in FIRST_PARTY:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                imported[alias.asname or alias.name] = sub if _is_package(base) and module_file(sub) else base
        elif isinstance(node, ast.Import):
            for alias in node.names:  # `import tasks.x` binds `tasks`; `import tasks.x as y` binds y to tasks.x
                imported[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    if stage not in functions:
        raise KeyError(f"{path}: no function for stage {stage!r}")
    modules: set[str] = set()
    seen: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in _runtime_nodes(functions[name]):
            if isinstance(node, ast.Name):
                if node.id in functions:
                    todo.append(node.id)
                elif node.id in imported:
                    modules.add(imported[node.id])
            elif isinstance(node, ast.ImportFrom):  # a function-level import
                base = _absolute(node, WIRING_MODULE)
                if base.split(".")[0] in FIRST_PARTY:
                    modules.update(_imported_modules(base, tuple(a.name for a in node.names)))
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
    return {m for m in modules if m.split(".")[0] in FIRST_PARTY}


def stage_code_files(stage: str, user_modules: Iterable[str] = ()) -> list[Path]:
    """Every source file the stage runs: the wiring module, its modules' closure, and the user's modules.

    The wiring module's own file counts (it decides what the stage is called with), but its imports are
    not followed: it imports every stage, and only what this stage's function uses runs for it.
    """
    modules = module_closure(stage_entry_modules(stage)) | module_closure(list(user_modules), packages=())
    modules |= {*_parents(WIRING_MODULE), WIRING_MODULE}
    return sorted({module_file(name) for name in modules})


def code_fingerprint(files: Iterable[Path], root: Path | None = None) -> dict[str, str]:
    """{file: sha256 of its bytes}; paths under `root` are relative, others as absolute paths."""
    entries = {}
    for path in files:
        shown = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else str(path)
        entries[shown] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(entries.items()))


def fingerprint_text(fingerprint: dict[str, str]) -> str:
    return json.dumps(fingerprint, indent=1, sort_keys=True) + "\n"
