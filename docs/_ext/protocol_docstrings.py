"""
A griffe extension for the API reference: structural implementations of a protocol borrow
the protocol's docstrings.

ducto's stores match `ducto.interface.base.CreditStore` without subclassing it, so
docstrings cannot be inherited through the class hierarchy (what
``griffe_inherited_docstrings`` does). This extension treats a class as implementing a
protocol when it defines every method the protocol declares, and gives each of its methods
that has no docstring the protocol method's docstring. Methods with their own docstring keep
it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from griffe import Class, Extension, Module, Object


def _classes(obj: Object) -> Iterator[Class]:
    for member in obj.members.values():
        if member.is_alias:
            continue
        if isinstance(member, Class):
            yield member
            yield from _classes(member)
        elif isinstance(member, Module):
            yield from _classes(member)


def _methods(cls: Class) -> dict[str, Object]:
    return {
        name: member
        for name, member in cls.members.items()
        if not member.is_alias and member.is_function
    }


class ProtocolDocstrings(Extension):
    """Copy protocol method docstrings onto undocumented methods of implementing classes."""

    def __init__(self, protocols: list[str]) -> None:
        """
        Configure the extension.

        Args:
            protocols: Paths of the protocols whose docstrings are lent, for example
                ``ducto.interface.base.CreditStore``.
        """
        self.protocols = protocols

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        """Lend docstrings once the whole package is loaded."""
        for path in self.protocols:
            if path.split(".", 1)[0] != pkg.name:
                continue
            protocol = pkg.get_member(path.split(".", 1)[1])
            if not isinstance(protocol, Class):
                continue
            declared = _methods(protocol)
            for cls in _classes(pkg):
                if cls is protocol:
                    continue
                methods = _methods(cls)
                if not declared.keys() <= methods.keys():
                    continue
                for name, method in methods.items():
                    source = declared.get(name)
                    if method.docstring is None and source is not None and source.docstring:
                        method.docstring = source.docstring
