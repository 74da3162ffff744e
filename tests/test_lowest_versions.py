"""The declared dependency ranges are promises: constraints/lowest.txt pins their lower bounds.

The first tests keep the constraints file and pyproject.toml from drifting apart (cheap, always
run). The last one runs scripts/check_lowest.sh, which builds a venv with exactly those versions
and runs the Hugging Face and TRL tests in it: minutes and gigabytes, so only with
WORKBENCH_LOWEST=1 (docs/versions.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints" / "lowest.txt"
SCRIPT = ROOT / "scripts" / "check_lowest.sh"
MUST_PIN = {"torch", "transformers", "trl"}  # the ranges the issue is about


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out = {}
    for text in reqs:
        r = Requirement(text)
        out[canonicalize_name(r.name)] = r
    return out


def pins() -> dict[str, tuple[str, Version]]:
    out = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        r = Requirement(line)
        specs = list(r.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"lowest.txt:{n}: {line!r} is not NAME==VERSION"
        name = canonicalize_name(r.name)
        assert name not in out, f"lowest.txt:{n}: {r.name} pinned twice"
        out[name] = (r.name, Version(specs[0].version))
    return out


def lower_bound(req: Requirement) -> Version | None:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", "===")]
    return max(lows) if lows else None


def test_constraints_pin_exactly_the_declared_lower_bounds():
    deps, bad = declared(), []
    for name, (shown, pinned) in pins().items():
        if name not in deps:
            bad.append(f"{shown}: pinned in lowest.txt but not declared in pyproject.toml")
            continue
        low = lower_bound(deps[name])
        if low is None:
            bad.append(f"{shown}: pyproject.toml declares no lower bound ({deps[name]})")
        elif pinned != low:
            bad.append(f"{shown}: lowest.txt pins {pinned}, pyproject.toml's lower bound is {low} ({deps[name]})")
        elif not deps[name].specifier.contains(pinned, prereleases=True):
            bad.append(f"{shown}: {pinned} is outside its own declared range {deps[name]}")
    assert not bad, "constraints/lowest.txt and pyproject.toml have drifted:\n" + "\n".join(bad)


def test_constraints_cover_torch_transformers_and_trl():
    missing = MUST_PIN - set(pins())
    assert not missing, f"constraints/lowest.txt must pin {sorted(missing)}"


def test_check_script_uses_the_constraints_and_its_own_venv():
    text = SCRIPT.read_text()
    assert "constraints/lowest.txt" in text
    assert "/tmp/workbench-lowest" in text and "--no-deps" in text
    assert ".venv/bin" not in text, "the lowest-versions check must never install into the project's .venv"


@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    os.environ.get("WORKBENCH_LOWEST") != "1",
    reason="set WORKBENCH_LOWEST=1 to build the lowest-versions venv (about 5 GB, 4 min fresh, 1 min reused) "
    "and run the HF and TRL tests in it: bash scripts/check_lowest.sh",
)
def test_hf_and_trl_tests_pass_at_the_lowest_versions():
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.setdefault("PYTHON", sys.executable)  # venv's own interpreter: a new venv is based on its base Python
    p = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"check_lowest.sh exited {p.returncode}:\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
