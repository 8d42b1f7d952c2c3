"""Who pays for a call: what a gateway's resolver returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ducto._shown import shown
from ducto.errors import InvalidArgumentError

__all__ = ["Payer"]


@dataclass(frozen=True, slots=True)
class Payer:
    """
    The account a call is billed to, as a gateway's resolver names it.

    A resolver may return a plain user id string instead; it stands for
    ``Payer(user_id)``.

    Attributes:
        user_id: The account the hold is placed on and the usage charged to; with
            `team_id`, the member the team's hold and usage are attributed to.
        metadata: Extra keys stored on the hold and on the usage row (an API key's id,
            a project, ...). ducto's own keys (model, token counts) win over these.
        team_id: A team pool to bill instead of the user's own credits (keyword only).
            The hold is placed on the pool for member `user_id` (the pool must cover it
            and the member's monthly cap must allow it) and the usage is charged to the
            pool as the member's ``team_usage``.
        scope: The budget scope the call counts in (keyword only): an API key's id, a
            project. It is stored as the hold's ``CreditMetadata.scope`` (replacing a
            ``scope`` key of `metadata`), so the user's spend caps scoped to it are checked
            atomically when the hold is placed, and the usage row carries it for
            `spend_by_scope`. None: the call counts only toward the user's unscoped caps.
    """

    user_id: str
    metadata: Mapping[str, object] | None = field(default=None)
    team_id: str | None = field(default=None, kw_only=True)
    scope: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        """Check the fields."""
        if not isinstance(self.user_id, str) or not self.user_id:
            raise InvalidArgumentError(
                f"user_id must be a non-empty str, got {shown(self.user_id)}"
            )
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise InvalidArgumentError(
                f"metadata must be a mapping or None, got {type(self.metadata).__name__}"
            )
        if self.team_id is not None and (not isinstance(self.team_id, str) or not self.team_id):
            raise InvalidArgumentError(
                f"team_id must be a non-empty str or None, got {shown(self.team_id)}"
            )
        if self.scope is not None and (not isinstance(self.scope, str) or not self.scope):
            raise InvalidArgumentError(
                f"scope must be a non-empty str or None, got {shown(self.scope)}"
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


def _hold_metadata(payer: Payer, **system: object) -> dict[str, object]:
    """The metadata of a payer's hold: its own keys, its scope, then the gateway's keys."""
    metadata: dict[str, object] = dict(payer.metadata or {})
    if payer.scope is not None:
        metadata["scope"] = payer.scope
    metadata.update(system)
    return metadata
