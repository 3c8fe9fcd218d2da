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


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_contracts_name_every_field_of_every_artifact():
    """docs/contracts.md documents each JSON artifact's fields: a field added to a dataclass
    without its line in the contract fails here."""
    from dataclasses import fields

    from dsc_export.artifacts import CutPoint, Engine, Manifest, ModelRef, Profile, Split, Timing
    from dsc_export.planning import Plan

    text = (ROOT / "docs" / "contracts.md").read_text()
    sections = {
        "Split manifest": (Manifest, ModelRef, Split, Engine, CutPoint),
        "Profile": (Profile, Timing),
        "Plan": (Plan,),
    }
    missing = []
    for heading, classes in sections.items():
        section = _section(text, heading)
        for cls in classes:
            for f in fields(cls):
                if not f.name.startswith("_") and not re.search(rf"`[^`]*\b{f.name}\b[^`]*`", section):
                    missing.append(f"{heading}: {cls.__name__}.{f.name}")
    assert missing == []
