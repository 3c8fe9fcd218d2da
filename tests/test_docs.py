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


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _verb_flags() -> dict[str, set[str]]:
    """verb -> every option name its ``--help`` lists, from the click command objects of the CLI's
    main group (wherever the CLI's module or package defines it)."""
    import click

    import dsc_export.cli as cli_module

    group = next(v for v in vars(cli_module).values() if isinstance(v, click.Group))
    ctx = click.Context(group)
    flags = {}
    for verb in group.list_commands(ctx):
        command = group.get_command(ctx, verb)
        names = {"--help"}
        for p in command.params:
            opts = list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", []))
            names.update(o for o in opts if o.startswith("--"))
        flags[verb] = names
    return flags


def _named_flags(text: str, verbs: set[str]) -> list[tuple[str, str]]:
    """(verb, --flag) for each flag docs/contracts.md names for a verb: in a row of the verbs
    table (first cell ``verb ...``), and in a code span ``dsc-export verb ... --flag``."""
    named = []
    for row in re.findall(r"^\|\s*`([^`]+)`\s*\|(.*)$", text, flags=re.M):
        verb = row[0].split()[0]
        if verb in verbs:
            named += [(verb, f) for f in FLAG.findall(row[0] + row[1])]
    for span in re.findall(r"`dsc-export ([^`]+)`", text):
        verb = span.split()[0]
        named += [(verb, f) for f in FLAG.findall(span)]
    return named


def test_contracts_name_only_flags_the_verbs_have():
    """Every ``--flag`` docs/contracts.md names for a verb is in that verb's --help."""
    flags = _verb_flags()
    named = _named_flags((ROOT / "docs" / "contracts.md").read_text(), set(flags))
    assert len({v for v, _ in named}) >= 5 and len(named) >= 8  # the table was parsed
    wrong = sorted({f"{verb} {flag}" for verb, flag in named if flag not in flags.get(verb, set())})
    assert wrong == [], f"docs/contracts.md names flags the verbs do not have: {', '.join(wrong)}"


def test_the_flags_check_catches_a_wrong_flag():
    flags = {"analyze": {"--json", "--plot", "--help"},
             "bundle": {"--device", "--server", "--help"}}
    text = ("| `analyze MODEL` | an ONNX model | a table (`--json`, `--chart`) |\n"
            "| `bundle DIR --side device\\|server` | a split dir | a tar |\n"
            "Then `dsc-export analyze m.onnx --plot x.png`.\n")
    named = _named_flags(text, set(flags))
    assert ("analyze", "--plot") in named
    wrong = sorted({f"{v} {f}" for v, f in named if f not in flags[v]})
    assert wrong == ["analyze --chart", "bundle --side"]
