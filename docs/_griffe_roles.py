"""A Griffe extension: turn the reST roles of portal_pool's docstrings into Markdown.

The docstrings are written for Sphinx (``:param x:`` fields, ``:class:`Name``` roles).
mkdocstrings parses the fields with ``docstring_style: sphinx`` but leaves the roles as
text. This rewrites each role as a cross-reference when it names something of
portal_pool, which mkdocs-autorefs then resolves (an unresolvable one fails the strict
build), and as plain code otherwise (``:class:`~anyio.from_thread.BlockingPortal```
becomes ``BlockingPortal``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|data|exc|obj):`(~?)([\w.]+)`")
PACKAGE = "portal_pool"


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _rewrite(pkg, pkg, set())

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # The same event under its Griffe 1 name.
        _rewrite(pkg, pkg, set())


def _rewrite(obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.docstring is not None:
        obj.docstring.value = ROLE.sub(lambda match: _link(match, obj, pkg), obj.docstring.value)
    for member in obj.members.values():
        if not member.is_alias:
            _rewrite(member, pkg, seen)  # type: ignore[arg-type]


def _link(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    short, target = match[1] == "~", match[2]
    label = target.rsplit(".", 1)[-1] if short else target
    path = _resolve(target, obj, pkg)
    if path is None:
        return f"`{label}`"
    return f"[`{label}`][{path}]"


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The public path of ``target`` as seen from ``obj``, or None if it is not ours."""
    if target.startswith(f"{PACKAGE}."):
        target = target[len(PACKAGE) + 1 :]
    elif "." in target and target.split(".", 1)[0] not in pkg.members:
        return None  # another package's name: anyio.…, concurrent.futures.…
    # A method or attribute of the class the docstring belongs to, or of its class.
    owner = obj if obj.is_class else obj.parent
    if owner is not None and owner.is_class and "." not in target and target in owner.members:
        return f"{PACKAGE}.{owner.name}.{target}"
    head = target.split(".", 1)[0]
    if head in pkg.members and not head.startswith("_"):
        return f"{PACKAGE}.{target}"
    return None
