"""The package's import rules (ARCHITECTURE.md), checked on the import graph read from the source.

    python tests/test_architecture.py          # prints the parts, the import layers and any broken rule

Every `import` counts, at the top of a module or inside a function: an import inside a function is still a
dependency. A rule broken here fails CI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_dist"
ENTRY = {"lora_dist", "lora_dist.__main__", "lora_dist.cli"}  # the package's front door and the command line
WINGS = ("train", "serve", "infer")
IMPORTERS = {"train": {"train", "entry"}, "serve": {"serve", "entry"}, "infer": {"infer", "serve", "entry"}}
MODEL = {"model", "frozen_linear"}  # the network itself
LORA = {"lora", "multi_lora"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, names like `lora_dist.train.loop`."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` / `from .pkg import mod` name modules; `from .mod import f` names the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import lora_dist.train.loop` -> that module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def part(module: str) -> str:
    """entry, a wing (train, serve, infer), or core."""
    if module in ENTRY:
        return "entry"
    rest = module.split(".")[1:]
    return rest[0] if rest and rest[0] in WINGS else "core"


def leaf(module: str) -> str:
    return module.rpartition(".")[2]


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that breaks a rule, and one per import cycle."""
    out = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = part(src), part(dst)
            if b in WINGS and a not in IMPORTERS[b]:
                wings = sorted(f"{w}/" for w in IMPORTERS[b] if w in WINGS)
                who = " and ".join(["the command line", *wings] if "entry" in IMPORTERS[b] else wings)
                out.append(f"{src} imports {dst}: only {who} import {b}/")
            if leaf(src) in MODEL and a == "core" and leaf(dst) in LORA:
                out.append(f"{src} imports {dst}: the model never imports LoRA (it is injected afterwards)")
            if leaf(src) == "data" and a == "core" and leaf(dst) in MODEL | LORA | {"weights", "build"}:
                out.append(f"{src} imports {dst}: data never imports the model")
    out += [f"import cycle among {', '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 imports nothing of the package, n imports something of layer n-1 (a cycle's
    modules are counted as one)."""
    depth: dict[str, int] = {}

    def d(v: str, seen: frozenset) -> int:
        if v in depth:
            return depth[v]
        deps = [w for w in graph[v] if w not in seen]
        depth[v] = result = 1 + max((d(w, seen | {v}) for w in deps), default=-1)
        return result

    for v in sorted(graph):
        d(v, frozenset())
    return depth


# ---------------------------------------------------------------------------------------------- tests


def test_the_package_keeps_its_import_rules():
    assert broken_rules(import_graph()) == []


def test_the_wings_are_where_the_rules_expect_them():
    graph = import_graph()
    assert {"lora_dist.train.loop", "lora_dist.serve.app", "lora_dist.infer.classifier", "lora_dist.device"} <= set(
        graph
    )
    assert "lora_dist.train.loop" in graph["lora_dist.cli"]  # the command line is the one way into training


def write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "lora_dist"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return pkg


def test_each_rule_catches_an_import_that_breaks_it(tmp_path):
    """A package that breaks every rule once: each break is reported, naming the two modules."""
    pkg = write_package(
        tmp_path,
        {
            "train/loop.py": "",
            "serve/app.py": "from ..train import loop\n",  # serving imports training
            "infer/classifier.py": "def f():\n    import lora_dist.train.loop\n",  # inside a function still counts
            "report.py": "from .serve.app import x\n",  # the core imports a wing
            "model.py": "from .lora import inject_lora\n",  # the model imports LoRA
            "lora.py": "",
            "data.py": "from . import model\n",  # data imports the model
            "a.py": "from .b import x\n",
            "b.py": "from .a import y\n",  # a cycle
            "serve/command.py": "from ..infer import classifier\n",  # allowed: serving runs inference
            "cli.py": "from .train.loop import run\nfrom .serve import app\n",  # allowed: the command line
        },
    )
    found = broken_rules(import_graph(pkg))
    expected = [
        "lora_dist.data imports lora_dist.model: data never imports the model",
        "lora_dist.infer.classifier imports lora_dist.train.loop: only the command line and train/ import train/",
        "lora_dist.model imports lora_dist.lora: the model never imports LoRA (it is injected afterwards)",
        "lora_dist.report imports lora_dist.serve.app: only the command line and serve/ import serve/",
        "lora_dist.serve.app imports lora_dist.train.loop: only the command line and train/ import train/",
        "import cycle among lora_dist.a, lora_dist.b",
    ]
    assert found == expected


def test_layers_count_the_longest_chain(tmp_path):
    pkg = write_package(tmp_path, {"a.py": "", "b.py": "from . import a\n", "c.py": "from . import a, b\n"})
    depth = layers(import_graph(pkg))
    assert (depth["lora_dist.a"], depth["lora_dist.b"], depth["lora_dist.c"]) == (0, 1, 2)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    g = import_graph(root)
    depth = layers(g)
    edges = sum(len(t) for t in g.values())
    for n in range(max(depth.values()) + 1):
        print(f"layer {n}: {', '.join(sorted(m.removeprefix('lora_dist.') for m, d in depth.items() if d == n))}")
    print(f"{len(g)} modules, {edges} imports between them, {max(depth.values()) + 1} layers")
    problems = broken_rules(g)
    print("\n".join(problems) if problems else "no rule broken, no cycle")
