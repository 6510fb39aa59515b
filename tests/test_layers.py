"""Import direction: the pure pieces never reach Lightning, the trainer never reaches the tools,
the lab work or the toy (only `rdpo.fit`, the composition root, chooses the toy), and there is
no import cycle.

Read statically from the sources: every ``import`` statement, at the top of a module or inside a
function (a lazy import is still a dependency: it runs when the function does), and relative
imports resolved. ``if TYPE_CHECKING:`` imports, which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Usable without Lightning (STYLE.md 16).
PURE = ("rdpo.pool", "rdpo.pairs", "rdpo.rounds", "rdpo.rollout", "rdpo.config", "rdpo.settings",
        "rdpo.preflight", "rdpo.families", "rdpo.judging", "rdpo.engine", "rdpo.tools.rubrics",
        "rdpo.tools.rubric_build")
LIGHTNING_PIECES = ("rdpo.module", "rdpo.data", "rdpo.callbacks", "rdpo.fit", "rdpo.strategy")
# Behind the trainer: the trainer's modules never import these ...
BEHIND = ("rdpo.tools", "rdpo.dev", "rdpo.demo")
# ... except the composition root, which builds the toy and its simulated judges, and the toy's
# cache paths, a leaf that imports nothing from rdpo (the config fills a toy run's paths from it).
ROOT_MAY_USE = {"rdpo.fit": ("rdpo.demo",)}
LEAVES = ("rdpo.demo.paths",)
# The command aliases: `python -m rdpo.export` etc. run the moved tools (`rdpo.__main__`).
ALIASES = ("rdpo.export", "rdpo.generate", "rdpo.rubrics", "rdpo.evaluate", "rdpo.bench",
           "rdpo.ablation", "rdpo.simjudges")
MAX_TOP_LEVEL = 30


def module_files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "rdpo").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "callbacks").glob("*.py"):
        files["rdpo.callbacks" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return files


def _type_checking_only(tree: ast.Module) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (dotted names; ``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the rdpo modules (and lightning) it imports, a package counted as its __init__."""
    files = module_files()
    return {name: {m for m in imports(name, path) if m in files or m.split(".")[0] == "lightning"}
            - {name} for name, path in files.items()}


def reach(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in g.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: a lazy import inside a function counts, a TYPE_CHECKING one does not."""
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rdpo.fit import fit\n"
                   "def f():\n    from rdpo.judging import judges\n    from .sibling import x\n")
    got = imports("rdpo.engine.mod", src)
    assert {"rdpo.judging", "rdpo.judging.judges", "rdpo.engine.sibling"} <= got
    assert "rdpo.fit" not in got


def test_pure_pieces_never_reach_lightning():
    g = graph()
    bad = {}
    for name in g:
        if not _under(name, PURE):
            continue
        hits = sorted(m for m in reach(g, name)
                      if m.split(".")[0] == "lightning" or _under(m, LIGHTNING_PIECES))
        if hits:
            bad[name] = hits
    assert not bad, f"pure modules that import Lightning (directly or through others): {bad}"


def test_no_import_cycles():
    g = graph()
    cycles = sorted(name for name in g if name in reach(g, name))
    assert not cycles, f"modules in an import cycle (function-level imports count): {cycles}"


def test_the_trainer_never_imports_tools_lab_work_or_the_toy():
    g = graph()
    bad = {}
    for name, deps in g.items():
        if _under(name, BEHIND) or name in ALIASES or name == "rdpo.__main__":
            continue
        allowed = ROOT_MAY_USE.get(name, ())
        hits = sorted(m for m in deps if _under(m, BEHIND) and not _under(m, LEAVES)
                      and not _under(m, allowed))
        if hits:
            bad[name] = hits
    assert not bad, f"trainer modules importing tools/, dev/ or demo/: {bad}"
    for leaf in LEAVES:
        assert not {m for m in g[leaf] if m.startswith("rdpo")}, f"{leaf} must import nothing from rdpo"


def test_aliases_only_forward_to_the_moved_command():
    from rdpo.__main__ import COMMANDS

    targets = {module for module, _ in COMMANDS.values()}
    for alias in ALIASES:
        source = module_files()[alias].read_text()
        assert "from rdpo.__main__ import run" in source and len(source.splitlines()) <= 8, alias
        assert any(f'run("{t}")' in source for t in targets), alias


def test_the_top_level_stays_small():
    top = sorted(p.name for p in (ROOT / "rdpo").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules at rdpo/'s top level: {top}"
