"""``docs/`` builds into a site (MkDocs Material, ``--strict``: a broken link or a page missing
from the navigation fails the build), whose home page is the README."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import PROJECT_ROOT
from worker.processes import BIN_DIR


def test_the_docs_build_strictly_with_the_readme_as_home_page(tmp_path: Path) -> None:
    site = tmp_path / "site"
    out = subprocess.run(
        [str(BIN_DIR / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    home = (site / "index.html").read_text()
    assert "Walkthrough" in home and 'href="api/"' in home  # README, links made relative
    for page in sorted((PROJECT_ROOT / "docs").glob("*.md")):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), page.name


def test_the_readme_stays_a_front_door() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert "./dev demo" in readme and "./dev test" in readme
