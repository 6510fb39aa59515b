"""README.md is the front door and docs/ the reference: the README stays short, reaches every
docs page, its file map names every module that exists (and none that does not), and every
relative link in README.md and docs/*.md lands on a file and, for a page, on a heading."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The text without fenced blocks and code spans (a `[x](y)` there is not a link)."""
    return CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def section(text: str, title: str) -> str:
    """The body of the `## title` section."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_readme_is_at_most_300_lines():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines (at most 300): move a section into docs/"


def test_docs_exist_and_every_page_is_linked_from_the_readme():
    assert DOCS, "docs/ holds no page"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n\n## A `b`: c\n\n[ok](#a-b-c) [gone](q.md) [code](`x`)\n"
                    "```\n[not a link](nowhere.md)\n```\n")
    assert anchors(page) == {"top", "a-b-c"}
    assert links(page) == ["#a-b-c", "q.md"]


def _modules() -> list[str]:
    """Every module under rdpo/ and callbacks/; a package's __init__.py is named by its folder."""
    out = []
    for top in ("rdpo", "callbacks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            out.append(rel[: -len("__init__.py")] if path.name == "__init__.py" else rel)
    return out


def test_file_map_names_every_module_and_only_modules_that_exist():
    body = section(README.read_text(), "Map of the files")
    named = set(re.findall(r"`((?:rdpo|callbacks)(?:/\w+)*(?:\.py|/))`", body))
    modules = _modules()
    assert not [m for m in modules if m not in named], (
        "README.md's map of the files lacks: "
        + ", ".join(m for m in modules if m not in named) + " (one line each, what it holds)")
    gone = sorted(n for n in named if not (ROOT / n).exists())
    assert not gone, f"README.md's map names modules that do not exist: {gone}"


def test_readme_test_commands_are_the_ones_ci_and_make_run():
    setup = section(README.read_text(), "Set-up: two commands")
    assert re.search(r"^make quickstart\b", setup, re.M) and re.search(r"^make test\b", setup, re.M)
    assert "`make test-fast`" in setup
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert all(re.search(rf"^{t}:", makefile, re.M) for t in ("quickstart", "test", "test-fast"))


def test_readme_imports_work():
    """The imports of "Using the pieces in your own Lightning project" run as written."""
    body = section(README.read_text(), "Using the pieces in your own Lightning project")
    code = "\n".join(re.findall(r"```python\n(.*?)```", body, re.S))
    imports = [line for line in code.splitlines() if line.startswith(("from ", "import "))]
    assert len(imports) >= 5
    exec("\n".join(imports), {})
