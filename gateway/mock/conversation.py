"""The conversation of one mock session: ordered items and their wire renderings (§3.4, §4.4, §5.4).

Items are stored GA-shaped (content types `input_text`, `input_audio`, `output_text`,
`output_audio`); `render_item` produces either dialect's shape. Audio bytes of an item live in
`Item.audio` (never in the content dicts) and are only put on the wire by `retrieve`.

A conversation keeps the audio of its newest items (newest added) up to KEPT_AUDIO_BYTES in
memory, and always that of the turn a reply answers (its newest user item in the conversation's
order), of the user item added last, and of a reply item still being spoken. The real server keeps it all, but a mock session of an hour's talk would
hold every turn and its echo (~170 MB each way), and a load test runs hundreds of them. An older
item keeps its audio's length, so usage, truncate and item events are as before; a reply asked
for an older turn (an `item_reference`) speaks a tone of its length rather than its echo, and
`conversation.item.retrieve` returns it without its audio.
"""
from __future__ import annotations

import base64
from typing import Any, Iterable, Optional

KEPT_AUDIO_BYTES = 1 << 20  # ~22 s of PCM16 at 24 kHz, ~2 min of G.711

# GA assistant content type -> beta content type
_BETA_CONTENT_TYPE = {"output_text": "text", "output_audio": "audio"}


class Item:
    """One conversation item.

    `audio` holds the item's audio in the format it was produced in (`audio_format`): the
    committed user turn, a client-supplied `input_audio`, or the assistant audio generated so
    far (a truncate shortens it); `audio_bytes` is its length, also once the conversation has
    let go of an old item's audio (`forget_audio`). `content` never contains audio bytes.
    """

    __slots__ = ("id", "type", "role", "status", "content", "call_id", "name", "arguments",
                 "output", "audio", "audio_format", "forgotten_bytes")

    def __init__(self, item_id: str, type_: str, *, role: Optional[str] = None,
                 status: str = "completed", content: Optional[list[dict[str, Any]]] = None,
                 call_id: Optional[str] = None, name: Optional[str] = None,
                 arguments: Optional[str] = None, output: Optional[str] = None,
                 audio: Optional[bytes] = None, audio_format: str = "audio/pcm") -> None:
        self.id = item_id
        self.type = type_
        self.role = role
        self.status = status
        self.content = content if content is not None else []
        self.call_id = call_id
        self.name = name
        self.arguments = arguments
        self.output = output
        self.audio = bytearray(audio) if audio else bytearray()
        self.audio_format = audio_format
        self.forgotten_bytes = 0

    @property
    def audio_bytes(self) -> int:
        return len(self.audio) or self.forgotten_bytes

    def forget_audio(self) -> None:
        self.forgotten_bytes, self.audio = len(self.audio), bytearray()

    def truncate_audio(self, length: int) -> None:
        del self.audio[length:]
        self.forgotten_bytes = min(self.forgotten_bytes, length)

    @property
    def is_assistant_audio(self) -> bool:
        return (self.type == "message" and self.role == "assistant"
                and any(part["type"] == "output_audio" for part in self.content))


def render_item(item: Item, dialect: str, with_audio: bool = False) -> dict[str, Any]:
    """The wire form of `item`. `with_audio` adds base64 audio (conversation.item.retrieved)."""
    out: dict[str, Any] = {"id": item.id}
    if dialect == "beta":
        out["object"] = "realtime.item"
    out["type"] = item.type
    out["status"] = item.status
    if item.type == "message":
        out["role"] = item.role
        parts = []
        for part in item.content:
            rendered = dict(part)
            if dialect == "beta" and part["type"] in _BETA_CONTENT_TYPE:
                rendered["type"] = _BETA_CONTENT_TYPE[part["type"]]
            if with_audio and part["type"] in ("input_audio", "output_audio") and item.audio:
                rendered["audio"] = base64.b64encode(item.audio).decode()
            parts.append(rendered)
        out["content"] = parts
    elif item.type == "function_call":
        out["name"] = item.name
        out["call_id"] = item.call_id
        out["arguments"] = item.arguments
    elif item.type == "function_call_output":
        out["call_id"] = item.call_id
        out["output"] = item.output
    return out


class Conversation:
    """Ordered items of the default conversation (`conv_…`)."""

    __slots__ = ("id", "_order", "_items")

    def __init__(self, conversation_id: str) -> None:
        self.id = conversation_id
        self._order: list[str] = []
        self._items: dict[str, Item] = {}

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._order)

    def get(self, item_id: str) -> Optional[Item]:
        return self._items.get(item_id)

    def items(self) -> list[Item]:
        return [self._items[item_id] for item_id in self._order]

    def add(self, item: Item, previous_item_id: Optional[str] = None) -> Optional[str]:
        """Insert `item` after `previous_item_id` ("root" = first; None = at the end).
        Returns the id of the item now before it (None when it is first)."""
        if previous_item_id is None:
            self._order.append(item.id)
        elif previous_item_id == "root":
            self._order.insert(0, item.id)
        else:
            self._order.insert(self._order.index(previous_item_id) + 1, item.id)
        self._items[item.id] = item
        self._forget_old_audio()
        return self.previous_of(item.id)

    def previous_of(self, item_id: str) -> Optional[str]:
        index = self._order.index(item_id)
        return self._order[index - 1] if index > 0 else None

    def _forget_old_audio(self) -> None:
        """Keep the audio of the newest items added (not the order they sit in: one inserted
        early is new all the same) up to KEPT_AUDIO_BYTES; that of older ones goes, except the
        newest user turn's and a reply item's still streaming (a reply's audio grows after its
        item is added: it counts from the next add on)."""
        # the turn a reply answers: the newest user message in the conversation's order (an
        # item inserted earlier does not change it), and the newest added
        answered = next((self._items[item_id] for item_id in reversed(self._order)
                         if self._items[item_id].role == "user"), None)
        kept = 0
        newest_turn = True
        for item in reversed(self._items.values()):  # dicts keep the order items were added in
            if not item.audio:
                continue
            kept += len(item.audio)
            if item.role == "user" and newest_turn:
                newest_turn = False
            elif kept > KEPT_AUDIO_BYTES and item.status != "in_progress" and item is not answered:
                item.forget_audio()

    def delete(self, item_id: str) -> None:
        self._order.remove(item_id)
        del self._items[item_id]


def find_call(items: Iterable[Item], call_id: str) -> Optional[Item]:
    """The function_call item among `items` (the conversation's, or a response's input) that
    has `call_id`; None when there is none."""
    for item in items:
        if item.type == "function_call" and item.call_id == call_id:
            return item
    return None
