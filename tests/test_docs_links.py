"""The README's and docs' relative links: every linked file exists and every #anchor names a
heading of its page (GitHub's slugs), so a renamed section cannot leave a dead link."""
import functools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slugs(markdown: str) -> set:
    """GitHub's heading anchors: lower case, characters other than letters, digits, '_',
    '-' and spaces dropped, spaces to '-'; a repeated slug gets -1, -2, ... Headings in
    fenced code are not headings."""
    seen, out, fenced = {}, set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6} +(.*?) *#* *$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_slugs_follow_githubs_rules():
    text = ("# Results: what the encoders learn\n## The paper's tables in miniature\n"
            "```bash\n# not a heading\n```\n## 8×8 — seeds\n## Notes\n## Notes\n")
    assert slugs(text) == {"results-what-the-encoders-learn", "the-papers-tables-in-miniature",
                           "88--seeds", "notes", "notes-1"}


@functools.lru_cache(maxsize=None)
def _anchors(path: str) -> frozenset:
    """The heading slugs of one page, read once however many links point at it."""
    with open(path, encoding="utf-8") as f:
        return frozenset(slugs(f.read()))


def _pages():
    pages = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    pages += sorted(os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))
    return pages


@pytest.mark.parametrize("page", _pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    with open(page, encoding="utf-8") as f:
        text = f.read()
    dead = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):          # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(linked):
            dead.append(f"{target}: no file {os.path.relpath(linked, ROOT)}")
        elif anchor and linked.endswith(".md") and anchor not in _anchors(linked):
            dead.append(f"{target}: no heading #{anchor}")
    assert not dead, f"{os.path.relpath(page, ROOT)}: dead links: {dead}"
