import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_citation_cff_is_valid():
    exe = ROOT / ".venv-tools" / "bin" / "cffconvert"
    exe = str(exe) if exe.exists() else shutil.which("cffconvert")
    if exe is None:
        pytest.skip("cffconvert is not installed (scripts/test.sh installs it into .venv-tools)")
    proc = subprocess.run([exe, "--validate", "-i", str(ROOT / "CITATION.cff")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout
