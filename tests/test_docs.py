"""The project carries its own contract: docs/ names every error code the app produces, every
link in the README and docs/ leads somewhere, and nothing cites a file outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from shared.errors import STATUS_BY_CODE

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_every_error_code_is_in_the_contract_with_its_status() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    table = api.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(
        (code, int(status))
        for status, code in re.findall(r"^\| (\d{3}) \| `(\w+)` \|", table, re.M)
    )
    assert rows == STATUS_BY_CODE


def test_every_link_in_the_readme_and_docs_resolves() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL: not ours to check offline
            path, _, anchor = target.partition("#")
            found = (page.parent / path).resolve() if path else page
            if not found.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and found.suffix == ".md" and anchor not in anchors(found):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_short_and_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.index("make run") < readme.index("## Call it")
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


def test_nothing_cites_a_document_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "grep", "-l", "-e", "API\\.md", "-e", "\\.\\./shared/", "--", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tracked.returncode in (0, 1), tracked.stderr  # 1: nothing found
    assert tracked.stdout.split() == []
