"""docs/protocol.md's message table says exactly what the schemas hold: every kind, every field, and the
fields of nested records (profile, train, metrics)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from nefl_edge.core.schemas import MESSAGE_TYPES, Message

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
COMMON = set(Message.model_fields) | {"kind"}


def documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+)` \| (.*) \|$", DOC.read_text(), flags=re.M)
    return {kind: fields for kind, fields in rows if kind in MESSAGE_TYPES}


def top_level(fields: str) -> set[str]:
    return set(re.findall(r"`([a-z_0-9]+)`", re.sub(r"\([^)]*\)", "", fields)))


def nested(fields: str) -> dict[str, set[str]]:
    return {
        name: {f.strip() for f in inner.split(",")}
        for name, inner in re.findall(r"`([a-z_0-9]+)` \(([^)`]*)\)", fields)
    }


def test_every_message_kind_is_documented_with_exactly_its_fields() -> None:
    rows = documented()

    assert set(rows) == set(MESSAGE_TYPES)
    for kind, cls in MESSAGE_TYPES.items():
        assert top_level(rows[kind]) == set(cls.model_fields) - COMMON, kind
        for name, listed in nested(rows[kind]).items():
            inner = cls.model_fields[name].annotation
            assert isinstance(inner, type) and issubclass(inner, BaseModel), (kind, name)
            assert listed == set(inner.model_fields), (kind, name)


def test_the_check_notices_a_missing_field() -> None:
    assert top_level("`node`, `state`") != top_level("`node`")
