"""The package's shape: no import cycle, and each module imports only its own layer or lower
ones (config and models at the bottom, the commands at the top). Read from the source with
``ast`` (function-local imports count too), so nothing is imported to check it."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "titan_lite"
# Lowest first. A module may import its own layer and those below it; a package's
# ``__main__`` (a command) may import anything.
LAYERS = [
    {"models"},
    {"config"},
    {"runtime", "loss"},
    {"data"},
    {"finetune", "parallel", "optim"},
    {"hf", "checkpoint"},
    {"build"},
    {"inference", "validate"},
    {"train"},
    {"estimate", "generate", "predict", "evaluate"},
]


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the titan_lite modules its import statements run, package ``__init__``s
    included (importing ``a.b.c`` runs ``a.b`` first, unless the importer is inside ``a.b``)."""
    found = modules()

    def resolve(name: str) -> str:
        while name not in found and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in found else ""

    graph = {}
    for module, path in found.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("titan_lite") else ""
                if not target or target == module:
                    continue
                targets.add(target)
                parts = target.split(".")
                for end in range(2, len(parts)):
                    parent = ".".join(parts[:end])
                    if module != parent and not module.startswith(parent + "."):
                        targets.add(parent)
        graph[module] = targets - {"titan_lite"}  # the root package sets two constants
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if module.endswith(".__main__"):
        return len(LAYERS)
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_titan_lite_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_package_init():
    graph = {"titan_lite.config": {"titan_lite.config.schema"},
             "titan_lite.config.schema": {"titan_lite.data.tokenizer", "titan_lite.data"},
             "titan_lite.data": {"titan_lite.config"}, "titan_lite.data.tokenizer": set()}
    assert cycles(graph) == [["titan_lite.config", "titan_lite.config.schema",
                              "titan_lite.data"]]


def test_every_module_has_a_layer_and_imports_only_lower_ones():
    upward = [f"{module} imports {target}" for module, targets in import_graph().items()
              if module != "titan_lite" for target in sorted(targets)
              if layer(target) > layer(module)]
    assert upward == []
