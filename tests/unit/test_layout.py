"""The layout's promises, checked on the source: rooms that name the stages, data that
flows one way, one vocabulary, one config boundary, small functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("src", "streams", "models", "producers", "bench")
TRANSPORT = ROOT / "streams" / "worker" / "transport.py"
CLASS_NAMES = {"click", "cart", "fav", "purchase"}


def sources(*roots: str) -> Iterator[tuple[Path, ast.Module]]:
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def imported_modules(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_function_is_over_100_lines() -> None:
    long = [f"{rel(p)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p, tree in sources(*PACKAGES) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno is not None and n.end_lineno - n.lineno + 1 > 100]
    assert not long, long


def test_the_rooms_exist() -> None:
    for room in ("src/tailstream/stack", "src/tailstream/evaluation", "streams/worker",
                 "streams/trainer", "streams/stores", "models/imbalance", "models/towers",
                 "models/training", "models/serving"):
        assert (ROOT / room / "__init__.py").is_file(), room
    # Nothing is left beside the rooms in the stage folders.
    for stage in ("streams", "models"):
        loose = [p.name for p in (ROOT / stage).glob("*.py") if p.name != "__init__.py"]
        assert not loose, (stage, loose)


def test_the_worker_never_imports_the_trainer() -> None:
    bad = [(rel(p), m) for p, tree in sources("streams/worker", "streams/stores")
           for m in imported_modules(tree) if m.startswith("tailstream.streams.trainer")]
    assert not bad, bad


def test_data_flows_one_way() -> None:
    """The ground (settings, configs, contract, metrics, clients) and the models import
    neither the stages above them nor the roof (stack, evaluation, cli)."""
    ground = [p for p in (ROOT / "src" / "tailstream").glob("*.py") if p.name != "cli.py"]
    roof = ("tailstream.stack", "tailstream.evaluation", "tailstream.cli")
    bad = []
    for path in ground:
        for m in imported_modules(ast.parse(path.read_text())):
            if m.startswith((*roof, "tailstream.streams", "tailstream.models",
                             "tailstream.producers", "tailstream.bench")):
                bad.append((rel(path), m))
    for path, tree in sources("models"):
        for m in imported_modules(tree):
            if m.startswith((*roof, "tailstream.streams", "tailstream.producers")):
                bad.append((rel(path), m))
    assert not bad, bad


def _own_private_names(tree: ast.Module) -> set[str]:
    """Underscore attributes this module defines itself (``self._x = …``, class bodies)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr.startswith("_"):
                out.add(t.attr)
            elif isinstance(t, ast.Name) and t.id.startswith("_"):
                out.add(t.id)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("_"):
            out.add(node.name)
    return out


def test_private_attributes_of_other_libraries_are_touched_only_in_the_transport() -> None:
    """Faust, mode and aiokafka internals (``x._attr``) appear in one module only; any
    other module may use underscore attributes of its own objects only."""
    allowed = {("os", "_exit"), ("sys", "_current_frames")}  # documented, despite the "_"
    namedtuple_api = {"_replace", "_asdict", "_fields", "_make"}  # public, despite the "_"
    bad = []
    for path, tree in sources(*PACKAGES):
        if path == TRANSPORT:
            continue
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")) or node.attr in namedtuple_api:
                continue
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls")
                                               or (base.id, node.attr) in allowed):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and \
                    base.func.id == "super":
                continue
            if node.attr not in own:
                bad.append(f"{rel(path)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, bad


def test_the_class_vocabulary_is_defined_once() -> None:
    """No literal sequence of two or more class names outside the contract."""
    bad = []
    for path, tree in sources(*PACKAGES):
        if path.name == "contract.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                names = {e.value for e in node.elts
                         if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(names & CLASS_NAMES) >= 2:
                    bad.append(f"{rel(path)}:{node.lineno} {ast.unparse(node)[:60]}")
    assert not bad, bad


@pytest.mark.parametrize("name", ["Policy", "Limits", "RankingConfig", "GateConfig"])
def test_configs_are_built_from_settings_in_one_place(name: str) -> None:
    """The typed configs are constructed in tailstream.configs only (benchmarks may build
    fixed ones of their own, and the contract's docstrings show ``Limits()``)."""
    bad = [f"{rel(p)}:{n.lineno}" for p, tree in sources("src", "streams", "models", "producers")
           if p.name != "configs.py" for n in ast.walk(tree)
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]
    assert not bad, bad


def test_the_imbalance_math_and_the_worker_state_load_no_torch() -> None:
    code = ("import sys\n"
            "import tailstream.models.imbalance.policies, tailstream.models.imbalance.rolling\n"
            "import tailstream.models.imbalance.sketch, tailstream.models.imbalance.buffer\n"
            "import tailstream.models.imbalance.triggers, tailstream.models.imbalance.online\n"
            "import tailstream.streams.worker.imbalance, tailstream.streams.worker.state\n"
            "import tailstream.streams.worker.attribution, tailstream.models.serving.canary\n"
            "import tailstream.configs\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_one_routine_builds_the_fine_tuner_and_asks_the_gate() -> None:
    """The trainer, the evaluation and the benchmark all go through
    models/training/routine.py; nothing else constructs a FineTuner or calls the gate."""
    routine = ROOT / "models" / "training" / "routine.py"
    calls: dict[str, list[str]] = {"FineTuner": [], "decide": []}
    for path, tree in sources(*PACKAGES):
        for n in ast.walk(tree):
            if isinstance(n, ast.Call):
                name = n.func.id if isinstance(n.func, ast.Name) else (
                    n.func.attr if isinstance(n.func, ast.Attribute) else "")
                if name in calls:
                    calls[name].append(rel(path))
    assert calls == {"FineTuner": [rel(routine)], "decide": [rel(routine)]}
