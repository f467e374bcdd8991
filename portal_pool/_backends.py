"""Backend names and options, checked before any thread starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# anyio passes these to asyncio.Runner / uvloop and to trio.run. anyio's asyncio backend
# ignores unknown keys silently, so a typo such as "use_uvlop" would run plain asyncio
# with no error; the trio backend would fail late, inside the worker thread.
_VALID_OPTIONS = {
    "asyncio": frozenset({"debug", "loop_factory", "use_uvloop"}),
    "trio": frozenset(
        {
            "clock",
            "instruments",
            "restrict_keyboard_interrupt_to_checkpoints",
            "strict_exception_groups",
        }
    ),
}


def check_backend(backend: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the backend and its options; return the options as a new dict.

    :raises ValueError: for an unknown backend or option
    :raises ImportError: if the backend's package is not installed
    """
    if backend not in _VALID_OPTIONS:
        raise ValueError(f"unknown backend {backend!r}; use 'asyncio' or 'trio'")
    checked = dict(options or {})
    valid = _VALID_OPTIONS[backend]
    unknown = sorted(set(checked) - valid)
    if unknown:
        raise ValueError(
            f"unknown backend_options {unknown} for backend {backend!r}; "
            f"valid options are {sorted(valid)}"
        )
    if backend == "trio":
        _require("trio", "trio")
    elif checked.get("use_uvloop"):
        _require("uvloop", "uvloop")
    return checked


def _require(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed; install it with: pip install 'portal_pool[{extra}]'"
        ) from exc
