"""The package's import graph: no cycle, and no import inside a function except a heavy
library kept lazy on purpose, lossaudit's own modules from an entry point that must load
without torch (the pytest plugin loads in every project that installs lossaudit), or one
whose line says why (``# lazy: ...``)."""

import ast
from pathlib import Path

import lossaudit

PACKAGE = Path(lossaudit.__file__).parent
HEAVY = {"torch", "transformers", "accelerate", "matplotlib", "rich", "pandas", "numpy", "safetensors",
         "huggingface_hub", "peft", "trl", "lightning", "datasets", "tokenizers", "axolotl",
         "deepspeed", "swift"}
# entry points that must import without torch: their own-module imports wait for the call
LIGHT = {"lossaudit", "lossaudit.cli.app", "lossaudit.pytest_plugin", "lossaudit.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """Absolute names a statement imports (``from . import x`` gives ``pkg.x`` when x is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    names = [target]
    for alias in node.names:  # a submodule imported by name
        candidate = f"{target}.{alias.name}"
        if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or \
                (PACKAGE.parent / candidate.replace(".", "/")).is_dir():
            names.append(candidate)
    return names


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def scan():
    """(module -> set of own modules imported at import time, [function-level imports])."""
    graph, nested = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        source = path.read_text()
        tree, lines = ast.parse(source), source.splitlines()
        edges = set()

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets = resolve(name, child, path.name == "__init__.py")
                    own = [t for t in targets if t == "lossaudit" or t.startswith("lossaudit.")]
                    if in_function and "# lazy:" not in lines[child.lineno - 1] and "lazy:" not in lines[child.lineno - 1]:
                        nested.append((name, child.lineno, targets))
                    else:
                        edges.update(own)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
        graph[name] = {e for e in edges if e != name}
    return graph, nested


def find_cycle(graph):
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph, _ = scan()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_imports_inside_functions_are_heavy_libraries_or_light_entry_points():
    _, nested = scan()
    bad = []
    for module, line, targets in nested:
        for target in targets:
            own = target == "lossaudit" or target.startswith("lossaudit.")
            if own and (module in LIGHT or module.startswith("lossaudit.cli.commands")):
                continue
            if not own and target.split(".")[0] in HEAVY:
                continue
            bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_core_imports_nothing_above_it():
    """``core/`` is the math everything else rests on: it imports only itself (and libraries)."""
    graph, nested = scan()
    upward = [f"{module} imports {target}" for module, targets in graph.items() if module.startswith("lossaudit.core")
              for target in targets if not (target == "lossaudit.core" or target.startswith("lossaudit.core."))]
    upward += [f"{module}:{line} imports {target}" for module, line, targets in nested
               if module.startswith("lossaudit.core") for target in targets
               if target.startswith("lossaudit.") and not target.startswith("lossaudit.core")]
    assert not upward, "\n".join(sorted(upward))
