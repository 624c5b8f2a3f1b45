"""The house rules of agent2389_lib (docs/architecture.md): rooms in layers, imports pointing
down only, no cycles, no room over 600 lines, and paho's private names in the wire module only."""

import ast
import os
import re
import unittest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "agent2389_lib")
PACKAGE = "agent2389_lib"

# Each module's layer, top (6) to bottom (0); a module imports only from its own layer or below.
LAYERS = {
    6: ["cli", "cli.*", "gateway", "gateway.*", "__main__", "build_pyz"],
    5: ["runtime"],
    4: ["processor", "router"],
    3: ["mqtt", "mqtt.*"],
    2: ["llm", "llm.*", "tools", "tools.*", "dedupe", "pool", "discovery", "httpsessions", "jsonhttp", "otelexport",
        "tracers", "inflight", "cooldowns", "ratelimit", "approvaldesk"],  # tools.mcp.* too
    1: ["health", "logs", "errors", "tracing", "taskscope", "spend"],
    0: ["", "config", "config.*", "protocol", "redaction", "answers", "workflow", "metrics", "backoff", "outcome", "events",
        "cancels", "usage", "rfc3339", "approvals"],
}
MAX_LINES = 600
PAHO_PRIVATE_HOME = "mqtt.wire"


def modules() -> dict[str, str]:
    """Dotted name below the package ("" for the package itself) -> file path."""
    found = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted[:-len("__init__")].rstrip(".") if dotted.endswith("__init__") else dotted] = path
    return found


def layer_of(module: str) -> int:
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return layer
    raise AssertionError(f"module {module or PACKAGE} has no layer in LAYERS: place it (and in docs/architecture.md)")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def imports_of(module: str, path: str, known: dict) -> set[str]:
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(read(path))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module[len(PACKAGE) + 1:]
            else:
                continue
            targets = [f"{target}.{alias.name}".lstrip(".") for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            targets = [alias.name[len(PACKAGE) + 1:] for alias in node.names if alias.name.startswith(PACKAGE + ".")]
        for target in targets:
            if target in known and target != module:
                found.add(target)
                break
    return found


class ArchitectureTests(unittest.TestCase):
    def setUp(self):
        self.modules = modules()
        self.graph = {name: imports_of(name, path, self.modules) for name, path in self.modules.items()}

    def test_imports_point_down_the_layers(self):
        wrong = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
                 for module, targets in sorted(self.graph.items()) for target in sorted(targets)
                 if layer_of(target) > layer_of(module)]
        self.assertEqual(wrong, [])

    def test_no_import_cycles(self):
        done, path = set(), []

        def visit(module: str) -> None:
            if module in path:
                self.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
            if module in done:
                return
            path.append(module)
            for target in sorted(self.graph[module]):
                visit(target)
            path.pop()
            done.add(module)

        for module in sorted(self.graph):
            visit(module)

    def test_every_module_is_a_small_room(self):
        sizes = {module: read(path).count("\n") for module, path in self.modules.items()}
        self.assertEqual({m: n for m, n in sizes.items() if n > MAX_LINES}, {})

    def test_paho_private_names_live_in_the_wire_module_only(self):
        # paho's socket attributes by name, or any private attribute of a paho client
        private = re.compile(r"\b_sock\w*|\bclient\._[a-z]\w*")
        found = {module: private.findall(read(path))
                 for module, path in self.modules.items() if module != PAHO_PRIVATE_HOME}
        self.assertEqual({m: names for m, names in found.items() if names}, {})


if __name__ == "__main__":
    unittest.main()
