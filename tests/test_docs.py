"""The docs' internal links point at files and headings that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+\.md|[^)#\s]*/)(#[^)]+)?\)")


def anchors(md: Path) -> set[str]:
    heads = re.findall(r"^#+\s+(.+)$", md.read_text(), flags=re.M)
    return {"#" + re.sub(r"[^a-z0-9 -]", "", h.lower().replace("`", "")).replace(" ", "-") for h in heads}


def test_internal_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 3
    broken, checked = [], 0
    for page in pages:
        for target, anchor in LINK.findall(page.read_text()):
            checked += 1
            if target.startswith("http"):
                continue
            path = (page.parent / target).resolve()
            if not path.exists():
                broken.append(f"{page.name} -> {target}")
            elif anchor and path.is_file() and anchor not in anchors(path):
                broken.append(f"{page.name} -> {target}{anchor}")
    assert checked > 10 and broken == []
