"""The playback timeline on its own, on a clock the test sets (SPEC §2.4): where a barge-in
falls in what the client is playing, which replies are told `interrupted`, and which items are
truncated where. tests/test_interruption.py proves the same end to end through a real node."""
from __future__ import annotations

from gateway.playback import MAX_QUEUED_ITEMS, PlaybackTimeline, Segment

PCM16_BYTES_PER_MS = 48  # 24 kHz, 2 bytes a sample
G711_BYTES_PER_MS = 8


class CountingPath:
    """The two counters the audio path keeps for the item whose audio arrives now."""
    __slots__ = ("item_generated", "item_delivered")

    def __init__(self) -> None:
        self.item_generated = self.item_delivered = 0


def timeline(*owners: tuple[str, str]) -> PlaybackTimeline:
    """A timeline whose items (item, response) were announced by `response.output_item.added`."""
    playback = PlaybackTimeline(CountingPath())
    for item_id, response_id in owners:
        playback.note_item(item_id, response_id)
    return playback


def deliver(playback: PlaybackTimeline, item_id: str, ms: float, now: float,
            bytes_per_ms: int = PCM16_BYTES_PER_MS) -> None:
    """`ms` of the item's audio arrives from the upstream and goes to the client at `now`."""
    if item_id != playback.item:
        playback.start_item(item_id, now, bytes_per_ms)
    path = playback._path
    path.item_generated += int(ms * bytes_per_ms)
    path.item_delivered += int(ms * bytes_per_ms)


def test_a_reply_still_being_generated_is_cut_at_what_the_client_got():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 400, now=10.0)
    cut = playback.barge_in(10.1, active_response_id="resp_1")
    assert cut.interrupted == [("resp_1", 400)]
    assert cut.truncates == [("item_a", 400)]
    assert "item_a" in playback.interrupted_items and "resp_1" in playback.interrupted_responses


def test_a_finished_reply_is_cut_where_real_time_says_the_client_is():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 1000, now=10.0)
    cut = playback.barge_in(10.3, active_response_id=None)
    assert cut.interrupted == [("resp_1", 300)]
    assert cut.truncates == [("item_a", 300)]


def test_a_reply_played_out_is_no_barge_in():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 1000, now=10.0)
    assert playback.barge_in(11.5, active_response_id=None) is None
    assert not playback.interrupted_items


def test_nothing_delivered_is_no_barge_in_and_a_cut_reply_is_not_cut_twice():
    playback = timeline(("item_a", "resp_1"))
    assert playback.barge_in(10.0, active_response_id="resp_1") is None  # no audio yet
    deliver(playback, "item_a", 0, now=10.0)
    assert playback.barge_in(10.0, active_response_id="resp_1") is None
    deliver(playback, "item_a", 200, now=10.0)
    assert playback.barge_in(10.1, active_response_id="resp_1") is not None
    assert playback.barge_in(10.2, active_response_id="resp_1") is None


def test_a_reply_in_two_items_is_cut_in_the_item_being_played():
    playback = timeline(("item_a", "resp_1"), ("item_b", "resp_1"))
    deliver(playback, "item_a", 500, now=10.0)
    deliver(playback, "item_b", 500, now=10.0)
    cut = playback.barge_in(10.75, active_response_id=None)
    assert cut.interrupted == [("resp_1", 750)]      # a position in the reply, across its items
    assert cut.truncates == [("item_b", 250)]        # the first item was heard whole: kept


def test_a_reply_queued_behind_the_one_playing_is_cut_at_zero():
    playback = timeline(("item_a", "resp_1"), ("item_b", "resp_2"))
    deliver(playback, "item_a", 500, now=10.0)
    deliver(playback, "item_b", 500, now=10.1)        # generated before the first played out
    assert playback.segments() == [Segment("resp_1", "item_a", 500, 500), Segment("resp_2", "item_b", 500, 500)]
    cut = playback.barge_in(10.3, active_response_id=None)
    assert cut.interrupted == [("resp_1", 300), ("resp_2", 0)]
    assert cut.truncates == [("item_a", 300), ("item_b", 0)]
    assert {"item_a", "item_b"} <= playback.interrupted_items.keys()


def test_a_reply_after_the_queue_drained_starts_a_new_timeline():
    playback = timeline(("item_a", "resp_1"), ("item_b", "resp_2"))
    deliver(playback, "item_a", 100, now=10.0)
    deliver(playback, "item_b", 400, now=10.5)        # the first ended at 10.1
    cut = playback.barge_in(10.55, active_response_id=None)
    assert cut.interrupted == [("resp_2", 50)]
    assert cut.truncates == [("item_b", 50)]
    assert "item_a" not in playback.interrupted_items


def test_the_clients_playback_report_is_used_as_sent():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 1000, now=10.0)
    playback.report(250, "resp_1", now=10.5)          # the client buffered: behind real time
    cut = playback.barge_in(10.6, active_response_id=None)
    assert cut.interrupted == [("resp_1", 250)]
    assert cut.truncates == [("item_a", 250)]


def test_a_report_naming_the_second_reply_is_a_position_in_it():
    playback = timeline(("item_a", "resp_1"), ("item_b", "resp_2"))
    deliver(playback, "item_a", 500, now=10.0)
    deliver(playback, "item_b", 500, now=10.1)
    playback.report(120, "resp_2", now=10.62)
    cut = playback.barge_in(10.63, active_response_id=None)
    assert cut.interrupted == [("resp_2", 120)]
    assert cut.truncates == [("item_b", 120)]
    assert "item_a" not in playback.interrupted_items


def test_a_report_of_zero_truncates_at_zero():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 300, now=10.0)
    playback.report(0, "resp_1", now=10.0)
    cut = playback.barge_in(10.01, active_response_id="resp_1")
    assert cut.interrupted == [("resp_1", 0)]
    assert cut.truncates == [("item_a", 0)]            # the model must not believe it was heard


def test_a_report_older_than_what_was_left_to_play_means_playout_ended():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 500, now=10.0)
    playback.report(100, None, now=10.1)
    assert playback.barge_in(12.0, active_response_id=None) is None


def test_each_item_is_measured_in_its_own_format():
    playback = timeline(("item_a", "resp_1"), ("item_b", "resp_2"))
    deliver(playback, "item_a", 200, now=10.0, bytes_per_ms=PCM16_BYTES_PER_MS)
    deliver(playback, "item_b", 300, now=10.05, bytes_per_ms=G711_BYTES_PER_MS)  # a config in between
    assert playback.segments() == [Segment("resp_1", "item_a", 200, 200), Segment("resp_2", "item_b", 300, 300)]
    deliver(playback, "item_a", 0, now=10.06)          # back to the first: its own format again
    assert playback.segments()[0] == Segment("resp_1", "item_a", 200, 200)


def test_a_long_queue_keeps_the_latest_items_and_its_clock():
    replies = [(f"item_{n}", f"resp_{n}") for n in range(MAX_QUEUED_ITEMS + 8)]
    playback = timeline(*replies)
    for item_id, _response_id in replies:
        deliver(playback, item_id, 100, now=10.0)      # all generated at once, 100 ms each
    segments = playback.segments()
    assert len(segments) == MAX_QUEUED_ITEMS and segments[0].item_id == "item_8"
    cut = playback.barge_in(10.85, active_response_id=None)  # 850 ms in: 50 ms into item_8
    assert cut.interrupted[0] == ("resp_8", 50)
    assert cut.truncates[0] == ("item_8", 50) and len(cut.truncates) == MAX_QUEUED_ITEMS


def test_later_items_of_a_cut_reply_are_not_for_the_client():
    playback = timeline(("item_a", "resp_1"))
    deliver(playback, "item_a", 300, now=10.0)
    playback.barge_in(10.1, active_response_id="resp_1")
    assert playback.note_item("item_c", "resp_1") is True
    assert "item_c" in playback.interrupted_items
    assert playback.note_item("item_d", "resp_2") is False
