"""Bounded per-session memories: a session lives for up to an hour of turns, so whatever it keeps
per item, response or call (owners, byte counts, barge-in marks, dispatched calls) keeps only the
last RECENT entries — older ones are long finished, and forgetting them keeps memory flat."""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

RECENT = 256

#: the shared empty ordered set most sessions never add to (an empty dict is 64 B, a set 216)
EMPTY: Mapping = MappingProxyType({})


def remember(memory: dict, key, value) -> None:
    """`memory[key] = value`, forgetting the oldest entry past RECENT (dicts keep insertion
    order; re-setting a key keeps its place)."""
    memory[key] = value
    if len(memory) > RECENT:
        del memory[next(iter(memory))]


def added(items: Mapping[str, None], item: str) -> dict[str, None]:
    """`items` (an ordered set: a dict of None) with `item` added: the dict itself, or a new one
    in place of the shared `EMPTY`; past RECENT entries the oldest is forgotten."""
    if items is EMPTY:
        return {item: None}
    remember(items, item, None)  # type: ignore[arg-type]
    return items  # type: ignore[return-value]
