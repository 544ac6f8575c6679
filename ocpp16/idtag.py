"""OCPP 1.6 id tags (§7 IdToken, CiString20Type): the one normalization rule.

Declared once, here, for both sides: ``evse.auth`` (the chain, the RFID
reader, the control socket) and ``ocpp16.local_auth`` (the local list and
the cache) import it, so "the same card" means the same thing everywhere.
This module imports nothing but the standard library (``evse`` may import
``ocpp16``, never the other way round).
"""

from __future__ import annotations

from typing import Final

#: OCPP 1.6 IdToken (§7): CiString20Type.
ID_TAG_MAX_LENGTH: Final = 20


def normalize_id_tag(raw: str) -> str:
    """The canonical form of an identifier: stripped and upper-cased.

    OCPP 1.6 (§7) makes IdToken a CiString20Type, case-insensitive and at most
    20 characters, so "04a2b3c4" and "04A2B3C4 " are one card. Only printable
    ASCII is accepted: upper-casing other text can change its length ("ß" ->
    "SS"), so a 20-character tag could become 21, and readers and central
    systems use ASCII identifiers.

    Raises ``ValueError`` naming the value if it is not text, empty, longer
    than 20 characters or holds a character outside printable ASCII.
    """
    if not isinstance(raw, str):
        raise ValueError(f"id tag {raw!r} is not text")
    tag = raw.strip()
    if not tag:
        raise ValueError(f"id tag {raw!r} is empty")
    if len(tag) > ID_TAG_MAX_LENGTH:
        raise ValueError(
            f"id tag {raw!r} has {len(tag)} characters; OCPP allows at most {ID_TAG_MAX_LENGTH}"
        )
    bad = next((ch for ch in tag if not " " <= ch <= "~"), None)
    if bad is not None:
        raise ValueError(f"id tag {raw!r} holds {bad!r}, which is not printable ASCII")
    return tag.upper()


def same_id_tag(a: str | None, b: str | None) -> bool:
    """Whether two id tags name the same card (case-insensitively); False if either
    is None or not a valid id tag."""
    if a is None or b is None:
        return False
    try:
        return normalize_id_tag(a) == normalize_id_tag(b)
    except ValueError:
        return False


__all__ = ["ID_TAG_MAX_LENGTH", "normalize_id_tag", "same_id_tag"]
