"""The README stays short and points into docs/; every relative link and anchor resolves;
every page starts with the commands a user types and is listed in docs/README.md."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not headings in code
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#+ ", line)}


def test_slug_is_githubs():
    assert slug("Accuracy: estimate vs. measured on this machine") == (
        "accuracy-estimate-vs-measured-on-this-machine")
    assert slug('Any: Qwen2.5, `flavor = "auto"`') == "any-qwen25-flavor--auto"


def test_readme_is_short_and_reaches_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    index = (REPO / "docs" / "README.md").read_text()
    listed = {target.split("#")[0] for target in LINK.findall(index)}
    assert {p.name for p in PAGES if p.name != "README.md"} <= listed
    assert "docs/README.md" in readme


def broken_links(path: pathlib.Path) -> list[str]:
    """Relative links of a Markdown file whose file, or heading anchor, does not exist."""
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", path.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(target)
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(target)
    return broken


def test_broken_links_are_found(tmp_path):
    (tmp_path / "b.md").write_text("# B\n\n## Its part\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#its-part) [file](c.md) [anchor](b.md#nope) [web](https://x.y)\n"
                    "```\n[in code](d.md)\n```\n")
    assert broken_links(page) == ["c.md", "b.md#nope"]


@pytest.mark.parametrize("path", [REPO / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", [p for p in PAGES if p.name != "README.md"],
                         ids=lambda p: p.name)
def test_each_page_starts_with_the_commands_to_type(path):
    blocks = [b for b in path.read_text().split("\n\n") if b.strip()]
    # the title, the links home, (a section heading), then the commands
    first = next(b for b in blocks[1:] if not b.startswith(("[titan_lite]", "#")))
    assert first.startswith("```bash"), first[:80]
