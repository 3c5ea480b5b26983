"""The README and the manual in docs/ stay true: links resolve, the front door stays short, its set-up and test
commands are the ones CI runs, and docs/how-it-works.md names every module of the package as it is."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
HOW_IT_WORKS = DOCS / "how-it-works.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where Markdown links and headings live."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and links reduced to their text, lowercase, every character but
    letters, digits, '_', '-' and spaces dropped, then each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](target) -> text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def broken_links(path: Path) -> list[str]:
    """The relative links of one page that point at no file, or at a heading its target does not have."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        where = (path.parent / file_part).resolve() if file_part else path
        if not where.exists():
            broken.append(f"{target} (no file {where.relative_to(ROOT) if where.is_relative_to(ROOT) else where})")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target} (no heading #{anchor} in {where.relative_to(ROOT)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    assert links(page), f"{page.name} links to nothing; every page links to the others"
    assert not broken_links(page), f"broken links in {page.relative_to(ROOT)}: " + "; ".join(broken_links(page))


def test_the_slug_rule_is_githubs():
    assert slug("Seeds: mean ± spread") == "seeds-mean--spread"
    assert slug("Adversarial-input class (K+1 outputs)") == "adversarial-input-class-k1-outputs"
    assert slug("What `advcli train` prints") == "what-advcli-train-prints"
    assert slug("How strong is the [default](x.md) evaluation?") == "how-strong-is-the-default-evaluation"


def test_every_docs_page_is_linked_from_the_readme_and_the_index():
    for index in (README, DOCS / "index.md"):
        linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index) if t.partition("#")[0]}
        unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p != index and p.resolve() not in linked]
        assert not unlinked, f"{index.relative_to(ROOT)} does not link to " + ", ".join(unlinked)


def test_the_readme_is_a_front_door_not_the_manual():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move the detail "
                                       "into a page of docs/ and link to it")


def section(text: str, title: str) -> str:
    """A level-2 section of a Markdown text, from its heading to the next one."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def fenced_lines(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            lines.append(re.sub(r"\s+#(\s.*)?$", "", line).strip())  # the command, without its comment
    return lines


def ci_commands() -> dict[str, str]:
    """The commands .ci/run copies from the README: the line after its '# README, "Set up":' and '"Tests":'."""
    found, heading = {}, None
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        named = re.match(r'#\s*README,\s*"([^"]+)"', line.strip())
        if named:
            heading = named.group(1)
        elif heading and line.strip() and not line.lstrip().startswith("#"):
            found[heading], heading = line.strip(), None
    return found


def runs_as(ci_line: str) -> set[str]:
    """``python -m pip ...`` in CI is the README's ``pip ...`` run through the interpreter: the same command."""
    return {ci_line, ci_line.removeprefix("python -m ")}


def test_the_readme_set_up_and_tests_blocks_hold_the_commands_ci_runs():
    commands = ci_commands()
    assert set(commands) >= {"Set up", "Tests"}, f".ci/run names no README section for {commands}"
    text = README.read_text()
    for title in ("Set up", "Tests"):
        block = fenced_lines(section(text, title))
        assert runs_as(commands[title]) & set(block), (
            f".ci/run runs {commands[title]!r} as the README's '{title}' command, but that section's code block "
            f"holds {block}")
    assert "python -m pytest" in fenced_lines(section(text, "Tests"))


# --- the package's modules, named as they are -------------------------------------------------------------

PACKAGE = ROOT / "advcli"


def module_paths() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))


def moved_modules() -> dict[str, str]:
    """`advcli/__init__.py`'s MOVED_MODULES, read without importing the package."""
    for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MOVED_MODULES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("advcli/__init__.py has no MOVED_MODULES")


def test_how_it_works_names_every_module_of_the_package():
    page = HOW_IT_WORKS.read_text()
    unnamed = [path for path in module_paths() if f"`{path}`" not in page]
    assert not unnamed, ("docs/how-it-works.md has no line for " + ", ".join(unnamed)
                         + ": add one to its tree saying what the module does")


def test_how_it_works_maps_every_moved_module_to_its_new_place():
    page = HOW_IT_WORKS.read_text()
    missing = [f"advcli.{old} -> {new}" for old, new in moved_modules().items()
               if not re.search(rf"`advcli\.{old}`[^\n]*`{re.escape(new)}`", page)]
    assert not missing, "docs/how-it-works.md's table of moved modules lacks " + ", ".join(missing)


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def names_in_code() -> set[str]:
    """``advcli.*`` names the package writes that are not modules: the trackers' tags (``advcli.run_dir``, ...)."""
    return {name for path in PACKAGE.rglob("*.py")
            for name in re.findall(r"[\"'](advcli\.\w+)[\"']", path.read_text())}


def stale_module_references(page: Path) -> list[str]:
    """Module paths (``advcli/x.py``) and dotted names (``advcli.x.y``, ``-m advcli.x``) that name nothing in the
    package now: a path that is not there, a name that is neither a module nor a name the code writes (a tracker's
    tag), an old flat name of `MOVED_MODULES` (allowed in docs/how-it-works.md only, whose table says where each
    went), or a name below a module that the module does not define."""
    text = page.read_text()
    names, moved = module_names(), moved_modules()
    stale = [p for p in sorted(set(re.findall(r"(?<![\w/.-])advcli/[\w/]+\.py\b", text)))
             if not (ROOT / p).exists()]
    for name in sorted(set(re.findall(r"(?<![\w/.-])advcli(?:\.[A-Za-z_]\w*)+", text))):
        parts = name.split(".")
        if parts[1] == "configs":  # configs/ ships inside the wheel as advcli.configs
            continue
        if f"advcli.{parts[1]}" not in names:
            if not (parts[1] in moved and page == HOW_IT_WORKS) and name not in names_in_code():
                stale.append(name)
            continue
        known = max((n for n in names if name == n or name.startswith(n + ".")), key=len)
        rest = name[len(known) + 1:].split(".")[0]
        if rest and not re.search(rf"\b{re.escape(rest)}\b", names[known].read_text()):
            stale.append(name)
    return stale


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_modules_where_they_are_now(page):
    stale = stale_module_references(page)
    assert not stale, (f"{page.relative_to(ROOT)} names modules that are not there (see the table in "
                       f"docs/how-it-works.md): " + ", ".join(stale))
