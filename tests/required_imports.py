"""Imports for test modules that need a package mm15 requires only on some platforms (decord).

`import_required("decord")` imports it where mm15's own dependency list (pyproject.toml, read from
the installed metadata) requires it on this platform, and fails the test module when it is missing
there: a broken install must not look like a green run of skipped tests. Where the package is not a
dependency (no wheel for the platform), the module is skipped instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

import pytest
from packaging.requirements import Requirement


def required_here(distribution: str) -> bool:
    """Whether mm15's dependency list requires `distribution` on this platform (extras not counted)."""
    for line in importlib.metadata.requires("mm15") or []:
        requirement = Requirement(line)
        if requirement.name != distribution:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            return True
    return False


def import_required(name: str) -> ModuleType:
    """Import `name`; fail where mm15 requires it on this platform, skip where it does not."""
    if not required_here(name):
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"{name} is a required dependency of mm15 on this platform (pyproject.toml) but cannot be "
                    f"imported: {e}. Install it (pip install -e .) instead of skipping its tests.", pytrace=False)
