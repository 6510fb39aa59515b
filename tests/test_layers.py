"""Import direction: the pure pieces never reach Lightning, and there is no import cycle.

Read statically from the sources (every ``import`` statement, top-level or inside a function),
so a lazy import that would pull Lightning into a pure piece is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Usable without Lightning (STYLE.md 16): pool, scoring, pairs, judges, chat, rounds, loss,
# log-probs, packing, collation, batches, rollout, config, evaluation, preflight.
PURE = ("pool", "scoring", "pairs", "judges", "judge_cache", "chat", "rounds", "loss", "logps",
        "packing", "collate", "batches", "rollout", "config", "settings", "evaluate", "preflight", "rubrics",
        "rubric_build", "families", "vision_cache", "image_slots")
LIGHTNING_PIECES = ("rdpo.module", "rdpo.data", "rdpo.callbacks", "rdpo.fit", "rdpo.strategy")


def module_files() -> dict[str, Path]:
    files = {f"rdpo.{p.stem}": p for p in (ROOT / "rdpo").glob("*.py") if p.stem != "__init__"}
    files |= {f"rdpo.{p.relative_to(ROOT / 'rdpo').with_suffix('').as_posix().replace('/', '.')}": p
              for p in (ROOT / "rdpo").glob("*/*.py") if p.stem != "__init__"}
    files |= {f"rdpo.callbacks.{p.stem}": p for p in (ROOT / "callbacks").glob("*.py")
              if p.stem != "__init__"}
    return files


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: {m for m in imports(path) if m in files or m.split(".")[0] == "lightning"}
            for name, path in files.items()}


def reach(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in g.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_pure_pieces_never_reach_lightning():
    g = graph()
    bad = {}
    for name in PURE:
        reached = reach(g, f"rdpo.{name}")
        hits = sorted(m for m in reached
                      if m.split(".")[0] == "lightning" or m.startswith(LIGHTNING_PIECES))
        if hits:
            bad[name] = hits
    assert not bad, f"pure modules that import Lightning (directly or through others): {bad}"


def test_no_top_level_import_cycles():
    files = module_files()
    top: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only: what runs at import
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names))
                         if m in files}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        top[name] = deps - {name}
    cycles = sorted(name for name in top if name in reach(top, name))
    assert not cycles, f"modules in an import cycle: {cycles}"
