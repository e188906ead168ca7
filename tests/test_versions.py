"""The lower bounds pyproject.toml claims are the versions this suite runs with: every dependency has one, the
README's test command installs exactly them (`-c tests/lowest-versions.txt`, which must say the same), and the
installed release equals the bound (to the bound's precision). A test run on other versions fails here, so an
untested claim (transformers>=5.0 when 5.3 fails at import) cannot come back, and a newer release on the registry
cannot change what CI tests."""

import sys
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{requirement}: state one lower bound (>=), the version tested"
    return bounds[0]


def test_every_dependency_is_bounded_by_the_version_tested():
    for line in PROJECT["dependencies"]:
        requirement = Requirement(line)
        bound, installed = lower_bound(requirement), Version(version(requirement.name))
        assert requirement.specifier.contains(installed, prereleases=True), f"{requirement}: {installed} installed"
        tested = installed.release[: len(bound.release)]
        assert tested == bound.release, f"{requirement}: the suite runs {installed}; make the bound {installed}"


def test_the_test_install_pins_the_lower_bounds():
    pins = [line for line in (REPO / "tests" / "lowest-versions.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    bounds = [f"{Requirement(line).name}=={lower_bound(Requirement(line))}.*" for line in PROJECT["dependencies"]]
    assert pins == bounds
    assert "-c tests/lowest-versions.txt" in (REPO / ".ci" / "run").read_text()


def test_python_is_bounded_by_the_version_tested():
    bound = Version(PROJECT["requires-python"].removeprefix(">="))
    assert sys.version_info[: len(bound.release)] == bound.release
