"""The README and docs/ stay true to the tree: code-map paths exist, relative links resolve,
the README stays short. Pure file reads, no torch work (well under a second)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _code_map_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    start = re.search(r"^## Code map\s*$", text, re.M)
    assert start, "README.md has no '## Code map' section"
    rows = []
    for line in text[start.end():].splitlines():
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 2 and not set(cells[1]) <= set("-: ") and cells[1] != "go to":
            rows.append((cells[0], cells[1]))
    return rows


def test_code_map_paths_exist():
    rows = _code_map_rows()
    assert len(rows) >= 20, f"the code map looks truncated ({len(rows)} rows)"
    missing = []
    for concern, where in rows:
        paths = CODE_SPAN.findall(where)
        assert paths, f"code map row {concern!r} names no path in backticks: {where!r}"
        for p in paths:
            if not (ROOT / p).exists():
                missing.append(f"{p} (row: {concern})")
    assert not missing, "README code map names paths that do not exist:\n  " + "\n  ".join(missing)


def test_relative_links_resolve():
    broken = []
    for doc in [README, *DOCS]:
        for target in LINK.findall(_prose(doc.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken relative links:\n  " + "\n  ".join(broken)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines < MAX_README_LINES, (f"README.md has {lines} lines; keep it under {MAX_README_LINES} "
                                      "and move detail into docs/")


def test_slug_matches_github():
    assert _slug("`--data-path`, `--split`, blending") == "--data-path---split-blending"
    assert _slug("Launch scripts (`examples_seq_parallel/`)") == "launch-scripts-examples_seq_parallel"
    assert _slug("(c) The 30B script: SP 4 needs 16 GPUs of 80 GB, SP 8 (the default) fits 8") == \
        "c-the-30b-script-sp-4-needs-16-gpus-of-80-gb-sp-8-the-default-fits-8"
