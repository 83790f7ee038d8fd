"""MkDocs hook: the site's home page is the repository's README (one source, never a copy), its
links to ``docs/`` pages made relative to the site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

README = Path(__file__).parent / "README.md"
NOTE = (
    "!!! note\n"
    "    This page is the repository's README; its walkthrough is run by CI against "
    "`./dev serve`.\n"
)


def on_page_read_source(page: Any, config: Any) -> str | None:
    if page.file.src_uri != "index.md":
        return None
    text = README.read_text().replace("](docs/", "](")
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{NOTE}{rest}"
