"""The package's layers, read from the source of every module: no import cycle, no layer importing one above it, no
script imported as a library, no test module imported by another."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "diffusers_flat"
# Lowest first: a module may import its own layer's modules and those of the layers before it, never after.
LAYERS = [
    "errors",
    "utils",
    "data",
    "run_directory",
    "sampling",
    "methods",
    "training",
    "quantization",
    "metrics",
    "evaluation",
    "hub",
    "studies",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every diffusers_flat module `path` imports, anywhere in the file (inside functions and under `if
    TYPE_CHECKING:` too: an import made for annotations still ties the two modules together)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != "diffusers_flat"}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_every_module_belongs_to_a_layer():
    assert {module.split(".")[1] for module in graph()} == set(LAYERS)


def test_no_layer_imports_one_above_it():
    upward = [(a, b) for a, imports in graph().items() for b in imports if layer(b) > layer(a)]
    assert upward == []


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first walk closes: a module met again while it is still on the path."""
    state, cycles = {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(edges.get(module, ())):
            if state.get(other) == "open":
                cycles.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_import_graph_has_no_cycle():
    assert find_cycles(graph()) == []


def test_the_registry_measures_exactly_the_metrics_the_settings_accept():
    from diffusers_flat.evaluation.registry import METRICS
    from diffusers_flat.evaluation.settings import METRIC_NAMES

    assert tuple(METRICS) == METRIC_NAMES


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The two checks above can fail: on a hand-made graph, each finds what it must."""
    fake = tmp_path / "m.py"
    fake.write_text(
        "from diffusers_flat.studies.runner import StudyRunner\nimport diffusers_flat.errors\n"
        "if TYPE_CHECKING:\n    from diffusers_flat.hub.push import push_to_hub\n"
        "def f():\n    from diffusers_flat.metrics import fid\n"
    )
    assert imported_modules(fake) == {
        "diffusers_flat.studies.runner",
        "diffusers_flat.errors",
        "diffusers_flat.hub.push",
        "diffusers_flat.metrics",
        "diffusers_flat.metrics.fid",
    }
    assert layer("diffusers_flat.studies.runner") > layer("diffusers_flat.metrics.fid")
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_scripts_and_tests_import_no_script_nor_test_module():
    scripts = {p.stem for p in (REPO / "training_scripts").glob("*.py")}
    tests = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    for path in [*(REPO / "training_scripts").glob("*.py"), *(REPO / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name not in tests, f"{path.name} imports the test module {name}"
                if path.parent.name == "training_scripts":
                    assert name not in scripts, f"{path.name} imports the script {name}"
