"""The version bounds pyproject.toml declares are the ones CI tests: its lower bounds are constraints-oldest.txt's
pins, and requirements.lock's newest tested versions lie within them."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name.lower(): r for r in map(Requirement, project["dependencies"])}


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            pins[package.strip().lower()] = Version(version.strip())
    return pins


def test_the_oldest_tested_versions_are_the_declared_lower_bounds():
    declared, oldest = _declared(), _pins("constraints-oldest.txt")
    lower = {
        name: Version(spec.version)
        for name, r in declared.items()
        for spec in r.specifier
        if spec.operator == ">=" and name in oldest
    }
    assert lower == {name: oldest[name] for name in lower}
    assert set(oldest) <= set(lower)  # every pinned package has its lower bound declared


def test_the_newest_tested_versions_are_allowed():
    declared = _declared()
    for name, version in _pins("requirements.lock").items():
        if name in declared:
            assert declared[name].specifier.contains(version), (name, version)


def test_the_command_line_starts_without_torch_and_the_public_names_load_on_use():
    """`rahf --help` and a Ctrl-C while the command starts must not wait for torch (seconds) to import: its
    imports happen inside the command, where an interrupt is answered in one line."""
    import subprocess
    import sys

    code = (
        "import sys, rahf, rahf.cli\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'trl', 'datasets'})\n"
        "print(heavy)\n"
        "from rahf import RahfConfig, run\n"
        "print(run.__module__, RahfConfig.__module__, rahf.__all__ == sorted(rahf._PUBLIC), 'run' in dir(rahf))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "rahf.pipeline rahf.config True True"
