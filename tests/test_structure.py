"""The code stays easy to read and to change: no module reaches into another's private names or into
another package's private modules, no module is over 400 lines and no function over 60, and `duplicates`
finds no repeated code in unsparse_tvm/, schedules/, relay_passes/ or benchmarks/. Each test lists every
offender, with its place."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it is installed as (pyproject's package-dir)
PACKAGES = {"unsparse_tvm": "unsparse_tvm", "schedules": "unsparse_tvm.schedules",
            "relay_passes": "unsparse_tvm.relay_passes"}
OURS = "unsparse_tvm"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
DUPLICATE_FREE = ("unsparse_tvm", "schedules", "relay_passes", "benchmarks")


@dataclass(frozen=True)
class Module:
    path: str           # relative to the repository root, as reported
    name: str           # dotted, as imported
    is_package: bool    # an __init__.py
    tree: ast.Module
    lines: int

    @property
    def package(self) -> str:
        """The package this module's relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _module(path: Path, folder: str) -> Module:
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    name = ".".join([PACKAGES[folder], *(parts[:-1] if is_package else parts)])
    source = path.read_text()
    return Module(str(path.relative_to(ROOT)), name, is_package, ast.parse(source, str(path)),
                  len(source.splitlines()))


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    found = [_module(p, folder) for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(found) > 50, "the source folders were not found"
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(dotted: str) -> bool:
    return dotted == OURS or dotted.startswith(OURS + ".")


def _source(module: Module, node: ast.ImportFrom) -> str:
    """The module `from X import ...` names, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private_module_use(module: Module, dotted: str) -> str | None:
    """Why importing module `dotted` from `module` is not allowed, or None: a private module (or package) is
    for the modules of the package that holds it (and for those inside it) alone."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        owner, private = ".".join(parts[:i]), ".".join(parts[: i + 1])
        inside = module.package in (owner, private) or module.package.startswith(private + ".")
        if _private(part) and not inside:
            return f"{private} is private to {owner}"
    return None


def _offences(module: Module, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """Why the import statement `node` takes a private thing from another of our modules (empty: it does not)."""
    if isinstance(node, ast.Import):
        return [why for alias in node.names if _ours(alias.name) and (why := _private_module_use(module, alias.name))]
    source = _source(module, node)
    if not _ours(source):
        return []
    whys = [why for why in [_private_module_use(module, source)] if why]
    for alias in node.names:
        if f"{source}.{alias.name}" in known:  # a submodule: `from . import _util`
            whys += [why for why in [_private_module_use(module, f"{source}.{alias.name}")] if why]
        elif _private(alias.name) and source != module.name:
            whys.append(f"{alias.name} is private to {source}")
    return whys


def test_no_private_name_is_imported_across_modules(modules):
    """`from .masks import _set_mask`, `from unsparse_tvm.relay_passes.sparsify_dense import _linear_weight`
    and `from unsparse_tvm.schedules._common import X` outside schedules/ couple a module to what another
    keeps the right to change. A package's own `_common.py` used inside that package is fine; third-party
    private modules (tvm's `_ffi_api`) are not ours to judge."""
    known = {m.name for m in modules}
    found = [f"{m.path}:{node.lineno}: {ast.unparse(node)}  ({why})"
             for m in modules for node in ast.walk(m.tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for why in _offences(m, node, known)]
    assert not found, f"{len(found)} imports of private names across modules:\n" + "\n".join(found)


def test_no_module_over_400_lines(modules):
    found = [f"{m.path}: {m.lines} lines" for m in modules if m.lines > MAX_MODULE_LINES]
    assert not found, f"{len(found)} modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(found)


def _functions(node: ast.AST, prefix: str = ""):
    """(qualified name, def) of every function and method below `node`, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = prefix + child.name
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, name + ".")
        else:
            yield from _functions(child, prefix)


def test_no_function_over_60_lines(modules):
    """From the `def` line to the last line of the body; decorators do not count."""
    found = [f"{m.path}:{fn.lineno}: {name}, {fn.end_lineno - fn.lineno + 1} lines"
             for m in modules for name, fn in _functions(m.tree)
             if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not found, f"{len(found)} functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


PAIR = re.compile(r"^D\d+ (\S+):\d+-\d+ ~ (\S+):\d+-\d+")


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` command is not on PATH here")
def test_duplicates_finds_no_pair_in_the_code():
    """Pairs with a side in tests/ or elsewhere do not count; a pair with both sides in the code does."""
    proc = subprocess.run(["duplicates", "--most", "50", "--seconds", "60"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = proc.stdout.splitlines()
    incomplete = [row for row in rows if row.startswith("incomplete:")]
    assert not incomplete, "duplicates did not read the whole tree:\n" + "\n".join(incomplete)
    found = [row for row in rows if (pair := PAIR.match(row))
             and all(Path(side).parts[0] in DUPLICATE_FREE for side in pair.groups())]
    assert not found, f"{len(found)} repeated pieces of code:\n" + "\n".join(found)
