"""The house rules docs/architecture.md states, checked on the source: imports point one way
(ops <- attention <- models <- train <- stages <- __main__; evaluate and generate beside train),
no import cycle, no module over 400 lines outside the Triton kernels."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "linearize"
# Each layer may import the layers below it (and the shared base modules), never one above.
LAYERS = {"ops": 1, "attention": 2, "models": 3, "train": 4, "evaluate": 4, "generate": 4, "stages": 5, "__main__": 6}
BASE = {"config", "log", "rundir", "data", "datafiles", "plots", "fingerprint"}  # used from every layer
MAX_LINES = 400


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text())
    return found


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The linearize modules ``name`` imports anywhere (function-level imports too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("linearize"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("linearize")}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, tree) for name, tree in MODULES.items()}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "linearize"


def test_imports_point_one_way():
    upward = []
    for module, imported in GRAPH.items():
        own = LAYERS.get(_area(module))
        for target in imported:
            theirs = LAYERS.get(_area(target))
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} -> {target}")
            if _area(module) in BASE and theirs is not None and theirs > LAYERS["models"]:
                upward.append(f"{module} (base) -> {target}")
    assert not upward, upward
    evaluate_or_generate = [m for m in GRAPH if _area(m) in ("evaluate", "generate")]
    assert not [(m, t) for m in evaluate_or_generate for t in GRAPH[m] if _area(t) == "train"]


def test_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("folder", ["linearize", "scripts"])
def test_no_module_over_400_lines(folder):
    kernels = {p for p in (ROOT / "linearize" / "ops").rglob("triton.py")}
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if p not in kernels and (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, long


def test_the_torch_free_name_lists_match_their_registries():
    """config's name lists check values before torch loads (``--help``, bad overrides); each must
    name exactly what its registry builds."""
    from linearize import config
    from linearize.attention import MIXERS
    from linearize.attention.feature_maps import FEATURE_MAPS
    from linearize.stages import RUNNERS

    assert set(config.FEATURE_MAPS) == set(FEATURE_MAPS)
    assert set(config.ATTENTION_KINDS) == {*MIXERS, "softmax"}  # softmax: the teacher's own, no mixer
    assert set(config.STAGES) == {*RUNNERS, "all"}  # all: the pipeline of the others
    assert set(config.PIPELINE_STAGES) <= set(RUNNERS)
