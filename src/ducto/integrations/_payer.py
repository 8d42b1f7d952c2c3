"""Who pays for a call: what a gateway's resolver returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ducto.errors import InvalidArgumentError

__all__ = ["Payer"]


@dataclass(frozen=True, slots=True)
class Payer:
    """
    The account a call is billed to, as a gateway's resolver names it.

    A resolver may return a plain user id string instead; it stands for
    ``Payer(user_id)``.

    Attributes:
        user_id: The account the hold is placed on and the usage charged to.
        metadata: Extra keys stored on the hold and on the usage row (an API key's id,
            a project, ...). ducto's own keys (model, token counts) win over these.
    """

    user_id: str
    metadata: Mapping[str, object] | None = field(default=None)

    def __post_init__(self) -> None:
        """Check the fields."""
        if not isinstance(self.user_id, str) or not self.user_id:
            raise InvalidArgumentError(f"user_id must be a non-empty str, got {self.user_id!r}")
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise InvalidArgumentError(
                f"metadata must be a mapping or None, got {type(self.metadata).__name__}"
            )


def _as_payer(value: object, source: str) -> Payer | None:
    """A resolver's answer as a `Payer` (None stays None)."""
    if value is None or isinstance(value, Payer):
        return value
    if isinstance(value, str):
        return Payer(value)
    raise InvalidArgumentError(
        f"{source} must return a user id str, a Payer or None, got {type(value).__name__}"
    )
