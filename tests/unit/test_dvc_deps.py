"""`dvc.yaml` deps that cannot drift from the code.

For every stage, the project modules `stages/<name>.py` imports — directly or through other
project modules, at module or function level — must each be covered by a dep of that stage
(the file itself, or a folder that contains it), or DVC would not rerun the stage when one of
them changes. Project files a stage lists but never imports, and deps that no longer exist,
fail too. The closure is read with `ast`, without importing anything.

Rules: `import a.b.c` and `from a.b import c` pull in `a/__init__.py`, `a/b/__init__.py` and
`a/b/c.py` (when `c` is a submodule); relative imports resolve against the importing module's
package; a package that imports its own modules by name (`importlib.import_module(f"{__name__}.…")`,
`pkgutil.iter_modules(__path__)`) pulls in all of them; `import_module("a.b")` counts as
`import a.b`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = ROOT / "dvc.yaml"
FORBIDDEN = {"stunning/cli.py": "the CLI is an entry point, not a library: move what the stage needs into stunning/"}


def _stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module_file(dotted: str) -> Path | None:
    """The file of project module `dotted` (`pkg/mod.py` or `pkg/mod/__init__.py`), else None."""
    if not dotted:
        return None
    base = ROOT.joinpath(*dotted.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _with_parents(dotted: str) -> list[str]:
    """`a.b.c` -> `a`, `a.b`, `a.b.c`: importing a module runs its packages' `__init__` first."""
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]  # `pkg/mod.py` -> pkg; `pkg/sub/__init__.py` -> pkg.sub


def _is_call(node: ast.AST, name: str) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Name) and func.id == name) or (isinstance(func, ast.Attribute) and func.attr == name)


def _imports_own_package_dynamically(tree: ast.Module) -> bool:
    """`importlib.import_module(f"{__name__}.…")` or `pkgutil.iter_modules(__path__)` in a package."""
    for node in ast.walk(tree):
        if not (_is_call(node, "import_module") or _is_call(node, "iter_modules")) or not node.args:
            continue
        arg = node.args[0]
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.FormattedValue):
            arg = arg.values[0].value
        if isinstance(arg, ast.Name) and arg.id in {"__name__", "__path__"}:
            return True
    return False


@cache
def _imports(path: Path) -> frozenset[Path]:
    """The project files `path` imports directly (module and function level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = _package_of(path)
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif _is_call(node, "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    files: set[Path] = set()
    for name in names:
        for dotted in _with_parents(name):
            file = _module_file(dotted)
            if file is not None:
                files.add(file)
    if path.name == "__init__.py" and _imports_own_package_dynamically(tree):
        files.update(p for p in path.parent.glob("*.py") if p != path)
        files.update(p for p in path.parent.glob("*/__init__.py"))
    files.discard(path)
    return frozenset(files)


def import_closure(path: Path) -> set[Path]:
    """`path` and every project file it imports, transitively."""
    seen: set[Path] = set()
    package = ".".join(_package_of(path))
    todo = [path, *(_module_file(p) for p in (_with_parents(package) if package else []))]
    while todo:
        file = todo.pop()
        if file is None or file in seen:
            continue
        seen.add(file)
        todo.extend(_imports(file))
    return seen


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def _outputs() -> set[str]:
    outs: set[str] = set()
    for stage in _stages().values():
        for key in ("outs", "metrics", "plots"):
            for out in stage.get(key, []):
                outs.add(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def dep_problems(name: str, stage: dict) -> list[str]:
    deps = [str(d) for d in stage.get("deps", [])]
    closure = sorted(_rel(p) for p in import_closure(ROOT / "stages" / f"{name}.py"))
    problems = [f"add under `{name}: deps:`   - {f}" for f in closure if not _covered(f, deps)]
    problems += [f"{f} is imported by stage {name!r}: {why}" for f, why in FORBIDDEN.items() if f in closure]
    outputs = _outputs()
    for dep in deps:
        if "${" in dep or dep in outputs or any(dep.startswith(o.rstrip("/") + "/") for o in outputs):
            continue  # data: a params path or another stage's output
        path = ROOT / dep
        if not path.exists():
            problems.append(f"remove from `{name}: deps:`   - {dep}   (no such file or folder)")
        elif path.is_file() and path.suffix == ".py" and dep not in closure:
            problems.append(f"remove from `{name}: deps:`   - {dep}   (stage {name!r} never imports it)")
        elif path.is_dir() and any(path.rglob("*.py")) and not any(_covered(f, [dep]) for f in closure):
            problems.append(f"remove from `{name}: deps:`   - {dep}   (stage {name!r} imports nothing in it)")
    return problems


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_its_import_closure(name):
    problems = dep_problems(name, _stages()[name])
    if problems:
        pytest.fail(f"dvc.yaml stage {name!r} (a folder dep covers every file under it):\n" + "\n".join(problems), pytrace=False)


def test_every_stage_module_has_a_stage():
    modules = {p.stem for p in (ROOT / "stages").glob("*.py") if not p.name.startswith("_")}
    assert modules == set(_stages()), "stages/*.py and dvc.yaml stages differ"


def test_closure_follows_function_level_submodule_and_relative_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    pkg = tmp_path / "lib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import helper\n")
    (pkg / "sub" / "helper.py").write_text("import json\n")
    (pkg / "sub" / "unused.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from lib.sub import helper\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "plugins").mkdir()
    (pkg / "plugins" / "__init__.py").write_text(
        "def load(n):\n    import importlib\n    return importlib.import_module(f'{__name__}.{n}')\n"
    )
    (pkg / "plugins" / "p1.py").write_text("import importlib\nimportlib.import_module('lib.dyn')\n")
    (pkg / "dyn.py").write_text("")
    (tmp_path / "stage.py").write_text("def main():\n    import lib.b\n    from lib import plugins\n")
    _imports.cache_clear()
    try:
        got = {p.relative_to(tmp_path).as_posix() for p in import_closure(tmp_path / "stage.py")}
    finally:
        _imports.cache_clear()
    assert got == {
        "stage.py", "lib/__init__.py", "lib/a.py", "lib/b.py", "lib/sub/__init__.py", "lib/sub/helper.py",
        "lib/plugins/__init__.py", "lib/plugins/p1.py", "lib/dyn.py",
    }
