"""How values appear in error messages: bounded, recognisable, never raising."""

from __future__ import annotations

from ducto._shown import shown


class _BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_ordinary_values_appear_as_their_repr() -> None:
    assert ["5", "-7", "'gift'", "1.5", "None", "True"] == [
        shown(v) for v in (5, -7, "gift", 1.5, None, True)
    ]


def test_ints_too_long_to_print_are_described_by_size() -> None:
    """Python cannot print ints of more than 4,300 digits; their size is shown instead."""
    assert "an int of about 5001 digits" == shown(10**5000)
    assert "a negative int of about 401 digits" == shown(-(10**400))
    assert str(2**255) == shown(2**255)  # 77 digits: still printed in full


def test_long_reprs_are_cut() -> None:
    text = shown("x" * 1000)

    assert 80 == len(text)
    assert "'" + "x" * 76 + "..." == text


def test_a_failing_repr_is_named_by_type() -> None:
    assert "a _BrokenRepr" == shown(_BrokenRepr())
