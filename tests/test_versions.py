"""The version policy: the range CI verifies is the range pyproject.toml allows, a newer release warns
once, and upstream breakages are scoped to the releases they apply to."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from star_hf.patching import architectures
from star_hf.patching.architectures import (
    UPSTREAM_FAILURES,
    VERIFIED_PEFT,
    VERIFIED_TRANSFORMERS,
    UpstreamFailure,
    check_versions,
    known_upstream_failures,
    upstream_failure,
)

ROOT = Path(__file__).parents[1]


def _pyproject_requirements() -> dict[str, Requirement]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text[text.index("dependencies = [") : text.index("]", text.index("dependencies = ["))]
    return {r.name: r for r in map(Requirement, re.findall(r'"([^"]+)"', block))}


def _lowest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


@pytest.mark.parametrize("package, verified", [("transformers", VERIFIED_TRANSFORMERS), ("peft", VERIFIED_PEFT)])
def test_lowest_pins_pyproject_and_the_verified_range_agree(package, verified):
    lowest, newest = verified
    requirement = _pyproject_requirements()[package]
    assert _lowest_pins()[package] == lowest
    assert Version(lowest) in requirement.specifier and Version(newest) in requirement.specifier
    # pyproject's lower bound is the lowest supported release: nothing older is allowed.
    (lower,) = [s for s in requirement.specifier if s.operator == ">="]
    assert Version(lower.version) == Version(lowest)


def test_ci_runs_the_suite_on_both_stacks():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "stack newest" in ci and "stack lowest -c constraints/lowest.txt" in ci
    assert 'python3 -m venv "$stacks/$name"' in ci  # a fresh venv per stack and run


@pytest.fixture
def installed(monkeypatch):
    versions: dict[str, str] = {}
    monkeypatch.setattr(architectures, "_installed", lambda package: versions.get(package))
    check_versions.cache_clear()
    yield versions
    check_versions.cache_clear()


def _version_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "star_hf is verified with" in str(w.message)]


def test_releases_inside_the_verified_range_do_not_warn(installed):
    installed.update(transformers=VERIFIED_TRANSFORMERS[1], peft=VERIFIED_PEFT[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_versions()
    assert not _version_warnings(caught)


def test_a_newer_transformers_warns_once_naming_the_range(installed):
    lowest, newest = VERIFIED_TRANSFORMERS
    installed.update(transformers="99.0.0", peft=VERIFIED_PEFT[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_versions()
        check_versions()
    (message,) = _version_warnings(caught)
    assert f"transformers {lowest} to {newest}" in message and "99.0.0 is installed" in message


def test_patch_model_on_a_newer_transformers_still_patches(installed, mixtral):
    import star_hf

    installed.update(transformers="99.0.0")
    with pytest.warns(UserWarning, match="star_hf is verified with transformers"):
        star_hf.patch_model(mixtral)
    assert len(star_hf.find_star_routers(mixtral)) == 2


def test_upstream_failures_apply_to_their_releases_only():
    failure = UpstreamFailure("SomeModel", since="5.24.0", fixed_in="5.26.0", error="E", advice="A")
    assert [failure.applies_to(v) for v in ("5.23.0", "5.24.0", "5.25.3", "5.26.0")] == [False, True, True, False]
    (llama4,) = [f for f in UPSTREAM_FAILURES if f.model_class == "Llama4ForConditionalGeneration"]
    assert upstream_failure("Llama4ForConditionalGeneration", "5.23.0") is None
    assert upstream_failure("Llama4ForConditionalGeneration", "5.24.0") is llama4
    assert upstream_failure("Llama4ForCausalLM", "5.24.0") is None
    assert known_upstream_failures("5.23.0") == []
    assert "broken upstream in transformers 5.24.0" in llama4.message("5.24.0")
