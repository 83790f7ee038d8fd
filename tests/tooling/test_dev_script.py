"""``./dev``, the developers' entry point: what it hands to the tools it bootstraps. Run in a copy
of the script whose ``.tools/bin/uv`` is a stand-in that records how it was called (installing
for real needs the package index: the stand-in is for that, and says so)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import PROJECT_ROOT

UV_STAND_IN = """#!/usr/bin/env bash
if [[ "$1" == "--version" ]]; then echo "uv {version}"; exit 0; fi
{{ echo "args=$*"; echo "UV_SYSTEM_CERTS=${{UV_SYSTEM_CERTS-unset}}"; }} >> "$(dirname "$0")/calls"
"""


def _install(tmp_path: Path, **env: str) -> str:
    shutil.copy(PROJECT_ROOT / "dev", tmp_path / "dev")
    version = next(
        line.split("=", 1)[1]
        for line in (PROJECT_ROOT / "dev").read_text().splitlines()
        if line.startswith("UV_VERSION=")
    )
    uv = tmp_path / ".tools" / "bin" / "uv"
    uv.parent.mkdir(parents=True)
    uv.write_text(UV_STAND_IN.format(version=version))
    uv.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    out = subprocess.run(
        ["bash", "./dev", "install"],
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return (uv.parent / "calls").read_text()


def test_install_makes_uv_trust_the_platform_certificate_store(tmp_path: Path) -> None:
    """Behind a TLS-inspecting proxy only the platform's store trusts the proxy's certificate."""
    calls = _install(tmp_path)
    assert "args=sync --frozen" in calls
    assert "UV_SYSTEM_CERTS=true" in calls


def test_install_leaves_an_explicit_certificate_choice_alone(tmp_path: Path) -> None:
    assert "UV_SYSTEM_CERTS=false" in _install(tmp_path, UV_SYSTEM_CERTS="false")
