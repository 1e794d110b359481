"""The project's shape: one-way imports between its packages, no import circles, small files, self-contained text."""

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

from tests.paths import REPO_ROOT

PACKAGES = ("attention", "configs", "data", "dit", "eval")
SCRIPTS = ("train", "sample")
# What each package may import from the project (besides itself): imports flow one way,
# scripts -> eval -> dit, data -> attention, and every package may use configs (the bottom layer).
ALLOWED = {
    "configs": set(),
    "attention": set(),
    "data": {"configs"},
    "dit": {"configs", "attention"},
    "eval": {"configs", "attention", "data", "dit"},
}
MAX_LINES = 600


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the packages and the scripts."""
    modules = {name: REPO_ROOT / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules a file imports (anywhere in the file), resolved to the longest known name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in known:
                    found.add(candidate)
                    break
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}


def test_packages_import_only_downwards():
    wrong = []
    for module, imports in import_graph().items():
        top = module.split(".")[0]
        if top in SCRIPTS:
            continue
        for target in imports:
            target_top = target.split(".")[0]
            if target_top != top and target_top not in ALLOWED[top]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the package layering:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import circles: {cycles}"


def test_the_circle_finder_finds_circles(monkeypatch):
    """The test above can fail: a made-up graph with a circle is reported."""
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    try:
        test_no_import_circles()
    except AssertionError as error:
        assert "['a', 'b', 'c']" in str(error)
    else:
        raise AssertionError("a circle a -> b -> c -> a was not reported")


def test_no_file_is_too_long():
    long = {str(p.relative_to(REPO_ROOT)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_project_speaks_of_itself():
    """No file names a path outside the repository or a work item."""
    pattern = re.compile(r"/work/|shared/spec|\bthe issue\b|\bissue #?\d", re.IGNORECASE)
    files = [*project_modules().values(), *REPO_ROOT.glob("docs/*.md"), REPO_ROOT / "README.md",
             *REPO_ROOT.glob("configs/**/*.yaml"), *REPO_ROOT.glob("tests/*.py")]
    hits = defaultdict(list)
    for path in files:
        if path.name == "test_structure.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line):
                hits[str(path.relative_to(REPO_ROOT))].append(number)
    assert not hits, f"lines naming outside paths or work items: {dict(hits)}"
