"""Every stage lists, in its dvc.yaml deps, the code it runs: its script and every `retrain`
module the script imports, directly or through other modules (imports inside functions
included). A missing one means DVC would not rerun the stage when that code changes."""

import ast
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PACKAGE = "retrain"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> Path | None:
    """src/retrain/a/b.py or src/retrain/a/b/__init__.py for `retrain.a.b`, None if neither."""
    base = REPO / "src" / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """`retrain` modules named by the import statements anywhere in a file, with the packages
    an import runs on its way (`retrain` itself for `retrain.base`)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from retrain import base` imports the module retrain.base
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE:
                modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {module for module in modules if module_file(module)}


def code_run_by(script: Path) -> set[str]:
    """The script and every package file it imports, transitively, relative to the repo."""
    files, seen, todo = {script}, set(), imported_modules(script)
    while todo:
        module = todo.pop()
        seen.add(module)
        path = module_file(module)
        files.add(path)
        todo |= imported_modules(path) - seen
    return {path.relative_to(REPO).as_posix() for path in files}


def stage_scripts(cmd: str) -> list[Path]:
    """The Python files a stage's command runs (`python stages/x.py ...`, `python -m mod`)."""
    words = shlex.split(cmd)
    scripts = [REPO / word for word in words if word.endswith(".py")]
    scripts += [module_file(words[i + 1]) for i, word in enumerate(words[:-1])
                if word == "-m" and words[i + 1].split(".")[0] == PACKAGE]
    return scripts


def test_the_import_walk_finds_lazy_and_transitive_imports():
    """The walk itself: `finetune` imports `reproducibility` inside main(), and `params`
    imports `backbones`, which it never names."""
    code = code_run_by(REPO / "stages" / "finetune.py")
    assert {"src/retrain/reproducibility.py", "src/retrain/params.py",
            "src/retrain/backbones.py", "src/retrain/__init__.py"} <= code


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(name):
    stage = STAGES[name]
    scripts = stage_scripts(stage["cmd"])
    assert scripts, f"{name}: no Python script found in its cmd"
    needed = set().union(*(code_run_by(script) for script in scripts))
    deps = {dep.rstrip("/") for dep in stage.get("deps", [])}
    # a dep on a folder (src/retrain) covers every file in it
    missing = sorted(path for path in needed
                     if not deps & {path, *(p.as_posix() for p in Path(path).parents)})
    assert not missing, f"dvc.yaml stage {name} lacks deps: {', '.join(missing)}"
