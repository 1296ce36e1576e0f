"""The library's shape, checked on its source: dependencies run one way, private names stay private, functions
stay short enough to read."""

import ast
from pathlib import Path

import turbosparse_lib

PACKAGE = Path(turbosparse_lib.__file__).parent
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only, which run no code)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(module: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, str | None]]:
    """(module imported, the name bound to it if a module was imported as a name) for each name of an import."""
    if isinstance(node, ast.Import):
        return [(a.name, a.asname or a.name) for a in node.names]
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    if node.level:  # relative: from the module's package, one level up per dot after the first
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for a in node.names:
        full = f"{base}.{a.name}"
        out.append((full, a.asname or a.name) if full in MODULES else (base, None))
    return out


def _owner(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _import_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for node in _runtime_nodes(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, _ in _imported(m, node):
                    owner = _owner(target)
                    if owner and owner != m:
                        graph[m].add(owner)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    cycles = _cycles(_import_graph())
    assert not cycles, f"modules that import each other (directly or around a loop): {cycles}"


def test_no_private_name_is_used_across_modules():
    used = []
    for m, p in MODULES.items():
        modules_by_name, tree = {}, ast.parse(p.read_text())
        for node in _runtime_nodes(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, bound in _imported(m, node):
                    if bound and target in MODULES:
                        modules_by_name[bound] = target
                if isinstance(node, ast.ImportFrom):
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    used += [f"{m} imports {name}" for name in private]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules_by_name
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                used.append(f"{m} uses {modules_by_name[node.value.id]}.{node.attr}")
    hint = "private names used outside their module (make them public where they belong):\n"
    assert not used, hint + "\n".join(used)


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{p.relative_to(PACKAGE.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in MODULES.values()
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 80 lines: split them into named steps\n" + "\n".join(long)


def test_every_console_script_offers_the_preset_choices_and_refuses_alike(capsys):
    """The five console scripts share ``turbosparse_lib.cli``: ``--preset`` lists its choices in ``--help`` (except
    turbosparse-data, which has no preset), and a bad preset exits 2 with argparse's message naming them."""
    import tomllib

    import pytest

    from turbosparse_lib.presets import PRESET_NAMES

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 5
    for name, target in scripts.items():
        module, func = target.split(":")
        main = getattr(__import__(module, fromlist=[func]), func)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith(f"usage: {name}"), help_text[:80]
        if name == "turbosparse-data":
            continue
        assert "{" + ",".join(PRESET_NAMES) + "}" in help_text, name
        with pytest.raises(SystemExit) as e:
            main(["--preset", "nope"])
        assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err, name
