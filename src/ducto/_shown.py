"""How a caller's value appears in an error message: recognisable, bounded, and never failing."""

from __future__ import annotations

import math

__all__ = ["shown"]

_MAX_CHARS = 80


def shown(value: object) -> str:
    """
    ``repr(value)`` for an error message, kept short.

    An int too long to print is described by its size instead (Python refuses to turn an int
    of more than 4,300 digits into text, which would replace the error being reported with
    a ``ValueError``), a long repr is cut with ``...``, and a value whose repr fails is named
    by its type.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        digits = int(math.log10(abs(value))) + 1
        article = "a negative" if value < 0 else "an"
        return f"{article} int of about {digits} digits"
    try:
        text = repr(value)
    except Exception:  # a failing repr must not hide the error being reported
        return f"a {type(value).__name__}"
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 3] + "..."
