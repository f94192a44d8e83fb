"""A dependency mm15 requires on this platform fails the test modules that need it when missing;
one it does not require here skips them."""

import sys

import pytest
from packaging.markers import Marker

from required_imports import import_required, required_here

DECORD_PLATFORMS = Marker("platform_machine == 'x86_64' and sys_platform == 'linux'")


def test_decord_is_required_exactly_where_pyproject_says():
    assert required_here("decord") == DECORD_PLATFORMS.evaluate()
    assert required_here("torch") and not required_here("pyarrow") and not required_here("pytest")


def test_missing_decord_fails_where_required_and_skips_elsewhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    if DECORD_PLATFORMS.evaluate():
        with pytest.raises(pytest.fail.Exception, match="decord is a required dependency of mm15"):
            import_required("decord")
    else:
        with pytest.raises(pytest.skip.Exception):
            import_required("decord")


def test_missing_optional_package_skips(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(pytest.skip.Exception):
        import_required("pyarrow")
