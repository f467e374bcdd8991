"""The public surface: exports, version, types."""

from __future__ import annotations

import inspect

import portal_pool


def test_all_matches_the_public_names() -> None:
    public = {
        name
        for name, value in vars(portal_pool).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(portal_pool.__all__) == public
    for name in portal_pool.__all__:
        assert getattr(portal_pool, name).__module__.startswith("portal_pool")


def test_version_comes_from_one_place() -> None:
    from importlib.metadata import version

    assert portal_pool.__version__ == version("portal_pool")


def test_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("portal_pool").joinpath("py.typed").is_file()
