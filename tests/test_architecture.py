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


def paths(graph: dict[str, set[str]], src: str) -> dict[str, list[str]]:
    """{every module `src` reaches: the shortest chain of imports from src to it}."""
    found = {src: [src]}
    queue = [src]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w not in found:
                found[w] = found[v] + [w]
                queue.append(w)
    del found[src]
    return found


def broken_rules(graph: dict[str, set[str]]) -> list[str]:
    """One line per module that reaches (imports, or imports something that imports, ...) a module a rule
    says it never reaches, and one per import cycle."""
    out = []
    for src in sorted(graph):
        for dst, chain in sorted(paths(graph, src).items()):
            a, b = part(src), part(dst)
            how = f"imports {dst}" if len(chain) == 2 else f"reaches {dst} through {' -> '.join(chain[1:-1])}"
            if b in WINGS and a not in IMPORTERS[b]:
                who = ", ".join(f"{w}/" for w in sorted(IMPORTERS[b] & set(WINGS)))
                out.append(f"{src} {how}: only {who} and the command line import {b}/")
            if leaf(src) in MODEL and a == "core" and leaf(dst) in LORA:
                out.append(f"{src} {how}: the model never imports LoRA (it is injected afterwards)")
            if leaf(src) == "data" and a == "core" and leaf(dst) in MODEL | LORA | {"weights", "build"}:
                out.append(f"{src} {how}: data never imports the model")
    out += [f"import cycle among {', '.join(c)}" for c in cycles(graph)]
    return out


LAUNCHER_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE"}  # what torchrun/Slurm say about a process: device.DistEnv reads it
# Where a rank is compared with 0: rank_zero.py (is_rank_zero, which train/tracking.py's output_for and inference's
# output_for ask), and one place that is no rank-0 side effect, with why.
RANK_ZERO_PLACE = "lora_dist.rank_zero"
RANK_ZERO_EXEMPT = {
    "lora_dist.cli": "every rank prints its own error line; rank 0 without the `(rank N)` prefix",
}


def _dotted(node: ast.AST) -> str:
    """`torch.backends.cuda.matmul.allow_tf32` for that attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def decisions_outside_their_place(root: Path = PACKAGE) -> list[str]:
    """One line per place outside device.py that decides device or precision process-wide (sets
    torch.backends flags or float32 matmul precision) or reads the launcher's rank variables, and per place outside
    rank_zero.py that compares a rank with 0 (a rank-0 side effect of its own)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if leaf(name) != "device" or part(name) != "core":
                targets = node.targets if isinstance(node, ast.Assign) else []
                if any(_dotted(t).startswith("torch.backends.") for t in targets):
                    out.append(f"{where} sets torch.backends flags: device and precision are decided in device.py")
                if isinstance(node, ast.Call) and (
                    _dotted(node.func).startswith("torch.backends.")
                    or _dotted(node.func) == "torch.set_float32_matmul_precision"
                ):
                    out.append(f"{where} calls {_dotted(node.func)}: device and precision are decided in device.py")
                if isinstance(node, ast.Constant) and node.value in LAUNCHER_ENV:
                    out.append(f"{where} reads {node.value}: rank and world size come from device.DistEnv")
            if name != RANK_ZERO_PLACE and name not in RANK_ZERO_EXEMPT and isinstance(node, ast.Compare):
                if not all(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                    continue  # `lora.rank > 0` is LoRA's rank
                sides = [node.left, *node.comparators]
                if any(isinstance(x, ast.Constant) and x.value == 0 for x in sides) and any(
                    _dotted(x).split(".")[-1] in ("rank", "global_rank") for x in sides
                ):
                    out.append(f"{where} compares a rank with 0: rank 0's output goes through rank_zero.py")
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


def test_device_precision_and_rank_0_are_decided_in_one_place_each():
    assert decisions_outside_their_place() == []


def test_the_one_place_checks_catch_a_package_built_to_break_them(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "device.py": "import os, torch\ntorch.backends.cudnn.allow_tf32 = True\nr = os.environ['RANK']\n",
            "train/strategy.py": "import torch\ntorch.backends.cuda.matmul.allow_tf32 = True\n",
            "train/graphs.py": "import torch\ntorch.backends.cuda.enable_cudnn_sdp(False)\n",
            "cli2.py": "import os\nrank = int(os.environ.get('RANK', 0))\n",
            "train/deepspeed_strategy.py": "def f(self):\n    if self.rank == 0:\n        print('x')\n",
            "rank_zero.py": "def is_rank_zero(rank):\n    return rank == 0\n",
            "train/tracking.py": "def output_for(rank):\n    return rank == 0\n",
            "infer/classify.py": "def main(env):\n    if env.rank != 0:\n        return\n",
        },
    )
    assert decisions_outside_their_place(pkg) == [
        "lora_dist.cli2:2 reads RANK: rank and world size come from device.DistEnv",
        "lora_dist.infer.classify:2 compares a rank with 0: rank 0's output goes through rank_zero.py",
        "lora_dist.train.deepspeed_strategy:2 compares a rank with 0: rank 0's output goes through rank_zero.py",
        "lora_dist.train.graphs:2 calls torch.backends.cuda.enable_cudnn_sdp: device and precision are decided in "
        "device.py",
        "lora_dist.train.strategy:2 sets torch.backends flags: device and precision are decided in device.py",
        "lora_dist.train.tracking:2 compares a rank with 0: rank 0's output goes through rank_zero.py",
    ]


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
        "lora_dist.data reaches lora_dist.lora through lora_dist.model: data never imports the model",
        "lora_dist.data imports lora_dist.model: data never imports the model",
        "lora_dist.infer.classifier imports lora_dist.train.loop: only train/ and the command line import train/",
        "lora_dist.model imports lora_dist.lora: the model never imports LoRA (it is injected afterwards)",
        "lora_dist.report imports lora_dist.serve.app: only serve/ and the command line import serve/",
        "lora_dist.report reaches lora_dist.train.loop through lora_dist.serve.app: only train/ and the command "
        "line import train/",
        "lora_dist.serve.app imports lora_dist.train.loop: only train/ and the command line import train/",
        "lora_dist.serve.command reaches lora_dist.train.loop through lora_dist.infer.classifier: only train/ and "
        "the command line import train/",
        "import cycle among lora_dist.a, lora_dist.b",
    ]
    assert found == expected


def test_the_rules_hold_over_paths_not_only_edges(tmp_path):
    """`data -> adapter -> model` breaks rule 5 though no single import does; `model -> helpers -> lora` rule 4."""
    pkg = write_package(
        tmp_path,
        {
            "data.py": "from . import adapter\n",
            "adapter.py": "from .model import GPT2\n",
            "model.py": "from . import helpers\n",
            "helpers.py": "from .lora import inject_lora\n",
            "lora.py": "",
        },
    )
    assert broken_rules(import_graph(pkg)) == [
        "lora_dist.data reaches lora_dist.lora through lora_dist.adapter -> lora_dist.model -> lora_dist.helpers: "
        "data never imports the model",
        "lora_dist.data reaches lora_dist.model through lora_dist.adapter: data never imports the model",
        "lora_dist.model reaches lora_dist.lora through lora_dist.helpers: the model never imports LoRA (it is "
        "injected afterwards)",
    ]


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
