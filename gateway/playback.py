"""What the client is playing, and what a barge-in cuts (SPEC §2.4).

A reply (response) may come in several items, and a reply generated faster than it plays may be
followed by the next before the client is done with it. So the client's playback queue is a
timeline of segments, one per (response, item) in the order the client got their audio, started
at the moment the first byte found the queue empty. The played position is a point on that
timeline: the client's last `playback` report when it sends them, else an estimate.

Units: positions and lengths in ms, times in event-loop seconds. Each item is measured in its
own format's bytes per ms: a `config` that changes the output format applies to later replies,
not to audio already queued.

The current item's byte counts live in the audio path (`item_generated`, `item_delivered`),
because the compiled fast path adds to them without calling Python; the timeline reads them
there and keeps finished items' counts itself.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from gateway.recent import EMPTY, added, remember

#: items the client may have queued at once: a reply generated far ahead of playback, or many
#: short ones. Past this the oldest is taken as heard (bounded memory, and it has long been).
MAX_QUEUED_ITEMS = 32


class Segment(NamedTuple):
    response_id: str | None
    item_id: str
    delivered_ms: float  # sent to the client
    generated_ms: float  # received from the upstream (a barge-in drops the rest of the item)


class Cut(NamedTuple):
    """What a barge-in decided: who to tell, and what to truncate upstream."""
    interrupted: list[tuple[str | None, int]]  # (response, ms of it played), for `interrupted`
    truncates: list[tuple[str, int]]            # (item, audio_end_ms), for conversation.item.truncate


class PlaybackTimeline:
    """One session's playback timeline; `item` is the item whose audio arrives now."""

    __slots__ = ("_path", "_item_bytes_per_ms", "_playing", "_started_at", "_played", "_finished",
                 "item", "item_response", "interrupted_items", "interrupted_responses")

    def __init__(self, path) -> None:
        self._path = path  # the AudioPath: the current item's byte counters
        self.item: str | None = None
        self._item_bytes_per_ms = 1
        # the (response, item) pairs on the timeline, in order; when it started (loop time);
        # the client's last `playback` report as (position in ms, loop time of the report)
        self._playing: tuple[tuple[str | None, str], ...] = ()
        self._started_at = 0.0
        self._played: tuple[float, float] | None = None
        # items switched away from: (bytes generated, bytes delivered, bytes per ms), the last RECENT
        self._finished: dict[str, tuple[int, int, int]] = {}
        self.item_response: dict[str, str] = {}  # item -> its response, the last RECENT
        # ordered sets, the last RECENT: audio of these is not for the client any more
        self.interrupted_items: Mapping[str, None] = EMPTY
        self.interrupted_responses: Mapping[str, None] = EMPTY

    def note_item(self, item_id: str, response_id: str) -> bool:
        """An output item was announced; True when it belongs to a reply already cut (its audio
        must not reach the client: the caller closes the path's gate for it)."""
        remember(self.item_response, item_id, response_id)
        if response_id in self.interrupted_responses:
            self.interrupted_items = added(self.interrupted_items, item_id)
            return True
        return False

    def start_item(self, item_id: str, now: float, bytes_per_ms: int) -> None:
        """Audio of `item_id` arrives (new, or again after another item's): swap the path's
        counters and place the item on the timeline. `bytes_per_ms` is the output format's now."""
        path = self._path
        if all(item != item_id for _response, item in self._playing):
            self._enqueue(item_id, now)
        if self.item is not None:
            remember(self._finished, self.item, (path.item_generated, path.item_delivered, self._item_bytes_per_ms))
        path.item_generated, path.item_delivered, self._item_bytes_per_ms = self._finished.pop(
            item_id, (0, 0, bytes_per_ms))
        self.item = item_id

    def _enqueue(self, item_id: str, now: float) -> None:
        response_id = self.item_response.get(item_id)
        playing = self._playing
        if playing and response_id is not None and response_id == playing[-1][0]:
            self._playing = playing + ((response_id, item_id),)  # the reply goes on in another item
            return
        segments = self.segments()
        queued_ms = sum(segment.delivered_ms for segment in segments)
        if not playing or playing[-1][1] in self.interrupted_items or now >= self._started_at + queued_ms / 1000.0:
            # the client's queue is empty (or was dropped at a barge-in): a new timeline
            self._playing = ((response_id, item_id),)
            self._started_at = now
            self._played = None
            return
        self._playing = playing + ((response_id, item_id),)  # queued behind what it still plays
        if len(self._playing) > MAX_QUEUED_ITEMS:
            forgotten = segments[0].delivered_ms
            self._playing = self._playing[1:]
            self._started_at += forgotten / 1000.0
            if self._played is not None:
                self._played = (max(0.0, self._played[0] - forgotten), self._played[1])

    def segments(self) -> list[Segment]:
        """The timeline item by item, in the order the client got them."""
        path = self._path
        segments = []
        for response_id, item in self._playing:
            if item == self.item:
                generated, delivered, bytes_per_ms = path.item_generated, path.item_delivered, self._item_bytes_per_ms
            else:
                generated, delivered, bytes_per_ms = self._finished.get(item, (0, 0, self._item_bytes_per_ms))
            segments.append(Segment(response_id, item, delivered / bytes_per_ms, generated / bytes_per_ms))
        return segments

    @staticmethod
    def replies(segments: list[Segment]) -> list[tuple[str | None, float, float]]:
        """(response, start ms on the timeline, ms delivered) of each reply on the timeline."""
        replies: list[list] = []
        position = 0.0
        for segment in segments:
            if not replies or replies[-1][0] != segment.response_id:
                replies.append([segment.response_id, position, 0.0])
            replies[-1][2] += segment.delivered_ms
            position += segment.delivered_ms
        return [tuple(reply) for reply in replies]  # type: ignore[misc]

    def report(self, played_ms: float, response_id: str | None, now: float) -> None:
        """The client's `playback`: `played_ms` into one reply — the one it names, else the one it
        is playing now by the clock. Kept as a position on the whole timeline."""
        replies = self.replies(self.segments())
        if not replies:
            return
        named = [reply for reply in replies if reply[0] == response_id] if response_id else []
        if named:
            start = named[0][1]
        else:
            clock_ms = (now - self._started_at) * 1000.0
            start = next((begin for _r, begin, length in replies if begin + length > clock_ms), replies[-1][1])
        self._played = (start + played_ms, now)

    def barge_in(self, now: float, active_response_id: str | None) -> Cut | None:
        """The user started speaking: None when nothing is playing; else the cut. The played
        position — the client's last report, else everything it got while a lone reply is still
        being generated (it plays as it comes), else real time since the timeline started —
        falls in one item: that item is truncated there and every later one (its audio exists
        upstream, unheard) at 0; each reply from that one on is told `interrupted`, and all
        their audio, later items included, is marked not for the client."""
        if self.item is None or self.item in self.interrupted_items:
            return None
        segments = self.segments()
        delivered_ms = sum(segment.delivered_ms for segment in segments)
        if delivered_ms == 0:
            return None
        last_response = segments[-1].response_id
        active = last_response is not None and last_response == active_response_id
        if self._played is not None:
            # the client's word, exact when fresh, at worst one report behind (then what it has
            # not said it heard counts as unheard); but a report older than what was left to
            # play means playout has ended since — not a barge-in
            position, reported_at = self._played
            if not active and position + (now - reported_at) * 1000.0 >= delivered_ms:
                return None
        elif active and segments[0].response_id == last_response:
            position = delivered_ms
        else:
            position = max(0.0, now - self._started_at) * 1000.0
        if not active and position >= delivered_ms:
            return None  # everything delivered has been played: nothing to interrupt
        position = min(position, delivered_ms)
        cut = 0  # the segment the position falls in (the last one at the very end)
        offset = position
        while cut < len(segments) - 1 and offset >= segments[cut].delivered_ms:
            offset -= segments[cut].delivered_ms
            cut += 1
        cut_response = segments[cut].response_id
        interrupted = [(response_id, int(max(0.0, position - begin)))
                       for response_id, begin, _length in self.replies(segments)
                       if response_id == cut_response or begin > position]
        for segment in segments[cut:]:
            self.interrupted_items = added(self.interrupted_items, segment.item_id)
            if segment.response_id is not None:
                self.interrupted_responses = added(self.interrupted_responses, segment.response_id)
        for other, owner in self.item_response.items():
            if owner in self.interrupted_responses:
                self.interrupted_items = added(self.interrupted_items, other)
        # also at 0 ms (barge-in before playback started, or a later item): an item with audio
        # accepts it, only one without any is refused ("Only model output audio messages can be
        # truncated", reference §7.6); untruncated, the model believes the user heard it all
        truncates = [(segment.item_id, int(min(offset, segment.delivered_ms, segment.generated_ms)) if index == 0 else 0)
                     for index, segment in enumerate(segments[cut:]) if segment.generated_ms > 0]
        return Cut(interrupted, truncates)
