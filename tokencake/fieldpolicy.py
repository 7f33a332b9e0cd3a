"""The server's one policy for request fields it does not know.

By default a request with unknown fields is refused, and the error lists *every* unknown field
(a client fixing one at a time would need as many round trips). ``tokencake serve --lenient``
ignores them instead. Fields the OpenAI ecosystem sends that change nothing here (``user``,
``metadata``, ``store``, ...) are not unknown: each endpoint accepts them by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class InvalidField(ValueError):
    """A request field is malformed or refused; ``param`` is its JSON path (``tools[0].type``).
    The HTTP layer answers 400 with ``param`` in the OpenAI error body."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class UnknownFields(InvalidField):
    """Fields not accepted here; ``param`` is the first one, ``fields`` all of them."""

    def __init__(self, fields: list[str]) -> None:
        names = ", ".join(repr(f) for f in fields)
        plural = "s" if len(fields) > 1 else ""
        super().__init__(
            f"unknown or unsupported field{plural} {names} (start the server with --lenient to "
            "ignore unknown fields)",
            fields[0],
        )
        self.fields = tuple(fields)


def unknown_fields(
    body: Mapping[str, Any], allowed: Iterable[str], *, lenient: bool, prefix: str = ""
) -> list[str]:
    """The names in ``body`` outside ``allowed`` (as ``prefix + name``). Raises
    :class:`UnknownFields` listing all of them unless ``lenient``, which returns them."""
    known = set(allowed)
    extra = sorted(prefix + k for k in body if k not in known)
    if extra and not lenient:
        raise UnknownFields(extra)
    return extra
