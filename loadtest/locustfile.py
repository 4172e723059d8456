"""Locust scenarios for realtime-gateway: many concurrent voice sessions on one node.

    locust -f loadtest/ --headless -u 200 -r 50 -t 60s --host ws://127.0.0.1:3001

Four user classes, one scenario each; pick them by class name (positional arguments) or by tag
(`--tags vad ptt barge_in text`). Without either, all four run, mixed by weight (4:3:2:1).

| class                 | tag        | session config              | one task = |
|-----------------------|------------|-----------------------------|------------|
| VadConversationUser   | `vad`      | `turn_detection:server_vad` | speak a clip (open mic: silence streams around it), wait for the whole reply |
| PushToTalkUser        | `ptt`      | `turn_detection:none`       | stream a clip, `commit`, `create_response`, wait for the whole reply |
| BargeInUser           | `barge_in` | `turn_detection:server_vad` | speak, and while the reply arrives speak the next clip over it: expect `interrupted`, then the reply to the interrupting turn |
| TextTurnUser          | `text`     | `turn_detection:none`       | send a `text` message, wait for the whole (spoken) reply |

Each user keeps one session open for `--turns` turns, then reconnects. Audio is paced in real
time by the session's microphone (`_session.Microphone`), not by Locust's wait_time; wait_time is
only the pause between turns (`--pause-ms`). The metrics are listed in `_metrics.py`.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

if __package__ in (None, ""):  # loaded by Locust as a top-level file (`locust -f loadtest/`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent
from locust import User, events, tag, task
from locust.exception import StopUser

from gateway.mock.options import MockOptions
from gateway.mock.responses import spoken_tone
from loadtest import _options
from loadtest._audio import BYTES_PER_MS, VAD_SETTINGS, bytes_to_ms, load_clips
from loadtest._metrics import (
    AUDIO_ROUND_TRIP, AUDIO_ROUND_TRIP_PTT, FIRST_AUDIO_AFTER_STOP, INTERRUPTED_REACTION, MIC_LATENESS,
    REPLY_COMPLETENESS, REPLY_COMPLETENESS_INTERRUPTED, TEXT, TEXT_ROUND_TRIP, VOICE, MetricReporter,
)
from loadtest._session import Reply, SessionClosed, SpeechEvent, TurnTimeout, Utterance, VoiceSession, clock

SCENARIO_TAGS = ("vad", "ptt", "barge_in", "text")
RECONNECT_BACKOFF_S = 1.0  # after a failed connect, so a refusing gateway is not hammered

TEXT_PROMPTS = (
    "What time is it in Lisbon?",
    "Spell the word gateway, please.",
    "Tell me a two sentence story about a lighthouse keeper.",
)


@events.init_command_line_parser.add_listener
def _add_arguments(parser, **_kwargs) -> None:
    _options.add_arguments(parser)


def _refuse(message: str) -> None:
    """Stop Locust at start with one line and exit code 2, as argparse does for a bad flag: a value
    that cannot work would otherwise fail every user (a traceback each, or failures that look like
    the gateway's)."""
    print(f"locust -f loadtest/: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)  # SystemExit passes through Locust's event hook, which logs other exceptions as crashes


@events.init.add_listener
def _check_options(environment, **_kwargs) -> None:
    """Validate the custom options and load the clip once, before any user starts. (In a
    distributed run a worker checks its own command line here; the master's values reach it
    later, and its users check them again in on_start.)"""
    try:
        _check_settings(environment)
    except ValueError as exc:
        _refuse(str(exc))


def _check_settings(environment) -> None:
    """ValueError naming the option unless the custom options can work and the clip loads."""
    settings = _options.LoadSettings.from_options(environment.parsed_options, environment.host)
    try:
        load_clips(settings.clip)
    except ValueError as exc:
        raise ValueError(f"--clip {exc}") from None


@events.test_start.add_listener
def _recheck_options(environment, **_kwargs) -> None:
    """The web UI's "Custom parameters" arrive with its start button, after `init` checked the
    command line: a value that cannot work stops that run at once, with one log line naming the
    option (its users stop without a traceback each, see `VoiceUser.on_start`)."""
    try:
        _check_settings(environment)
    except ValueError as exc:
        logging.getLogger("loadtest").error("locust -f loadtest/: %s: run stopped", exc)
        gevent.spawn_later(0, environment.runner.stop)  # once start() has returned


@events.init.add_listener
def _select_scenarios_by_tags(environment, **_kwargs) -> None:
    """Run only the user classes whose scenario tag survives --tags / --exclude-tags.

    Locust filters tasks by tag but keeps the user classes, and a user left without tasks fails
    at once; here each class has one scenario, so a class is kept exactly when its task is.
    """
    options = environment.parsed_options
    wanted = set(getattr(options, "tags", None) or ())
    excluded = set(getattr(options, "exclude_tags", None) or ())
    if not wanted and not excluded:
        return

    def selected(user_class: type) -> bool:
        scenario_tags = set().union(*(getattr(t, "locust_tag_set", set()) for t in user_class.tasks))
        return (not wanted or bool(scenario_tags & wanted)) and not scenario_tags & excluded

    kept = [user_class for user_class in environment.user_classes if selected(user_class)]
    if not kept:
        _refuse(f"no scenario matches the tags; scenario tags are {', '.join(SCENARIO_TAGS)}")
    environment.user_classes[:] = kept


class TurnAbandoned(Exception):
    """A turn failed (already reported); the session's state is uncertain, so it is replaced."""


class VoiceUser(User):
    """Base of the scenarios: one long-lived gateway session per user, reopened every `--turns`."""

    abstract = True
    host = _options.DEFAULT_HOST
    continuous_mic = True  # open microphone (server VAD) vs push-to-talk

    def wait_time(self) -> float:
        """Between turns the user listens to the rest of the reply (played in real time from its
        first byte, as a client would), then pauses `--pause-ms` before speaking again."""
        return max(0.0, self.playback_ends_at - clock()) + self.settings.pause_ms / 1000.0

    def listen(self, reply: Reply, audio_bytes: int) -> None:
        """The reply plays from its first byte for its duration; the next turn waits for the end."""
        self.playback_ends_at = reply.first_audio_at + bytes_to_ms(audio_bytes) / 1000.0

    def session_config(self) -> dict:
        """The `config` message sent right after connecting."""
        raise NotImplementedError

    def on_start(self) -> None:
        self.session: VoiceSession | None = None
        try:
            self.settings: _options.LoadSettings | None = _options.LoadSettings.from_options(
                self.environment.parsed_options, self.host)
            self.clips = load_clips(self.settings.clip)
        except ValueError:
            # reported once, by _recheck_options (or at init); the first task stops this user
            # (Locust logs a traceback for any exception on_start raises, StopUser included)
            self.settings = None
            return
        self.reporter = MetricReporter(self.environment.events)
        self.turn_index = 0
        self.playback_ends_at = 0.0

    def on_stop(self) -> None:
        session = getattr(self, "session", None)  # Locust may stop a user before on_start ran
        if session is not None:
            session.close()
            self.session = None

    def next_clip(self) -> bytes:
        clip = self.clips[self.turn_index % len(self.clips)]
        self.turn_index += 1
        return clip

    def config_message(self, **fields) -> dict:
        message = {"type": "config", "voice": "alloy", "instructions": "You are a load-test voice user.", **fields}
        if self.settings.model:
            message["model"] = self.settings.model
        return message

    def run_turn(self, turn: Callable[[VoiceSession], None]) -> None:
        """Open (or reuse) the session and run one turn on it; replace the session after a failure."""
        if self.settings is None:
            raise StopUser()  # options that cannot work (see on_start)
        session = self.session
        if session is not None and (session.closed or 0 < self.settings.turns <= session.turns_done):
            session.close()
            session = self.session = None
        if session is None:
            session = VoiceSession(self.settings, self.reporter, self.session_config(), self.continuous_mic)
            try:
                session.open()
            except SessionClosed:
                gevent.sleep(RECONNECT_BACKOFF_S)
                return
            self.session = session
        try:
            turn(session)
        except (TurnAbandoned, SessionClosed):
            session.close()
            self.session = None
            return
        session.turns_done += 1

    # ---- steps shared by the scenarios -------------------------------------------------------

    def expect(
        self, session: VoiceSession, condition: Callable[[], bool], what: str, request_type: str, metric: str,
        timeout_s: float | None = None,
    ) -> None:
        """Wait for `condition`; on timeout report a failure of `metric` and abandon the turn."""
        try:
            session.wait_until(condition, what, timeout_s)
        except TurnTimeout as exc:
            self.reporter.failure(request_type, metric, str(exc))
            raise TurnAbandoned from None

    def sample_delay(
        self, request_type: str, metric: str, since: float, until: float, since_what: str, until_what: str,
    ) -> None:
        """Report `until - since` (clock() seconds) as a sample of `metric`, in ms. A negative delay
        is not a fast reply but events in the wrong order (reply audio before the turn it answers
        ended): a failure, and the turn is abandoned."""
        ms = (until - since) * 1000.0
        if ms < 0:
            self.reporter.failure(
                request_type, metric, f"wrong order: {until_what} arrived {-ms:.0f} ms before {since_what}",
            )
            raise TurnAbandoned
        self.reporter.sample(request_type, metric, ms)

    def speak(self, session: VoiceSession, pcm: bytes) -> Utterance:
        """Queue `pcm` on the microphone and wait until its last frame is sent."""
        utterance = session.mic.say(pcm)
        self.finish_speaking(session, utterance)
        return utterance

    def finish_speaking(self, session: VoiceSession, utterance: Utterance) -> None:
        """Wait until the last frame of `utterance` is sent: its length in real time, plus
        --reply-timeout for a stalled socket; then report its mic lateness."""
        timeout_s = bytes_to_ms(len(utterance.pcm)) / 1000.0 + self.settings.reply_timeout_s
        self.expect(session, utterance.done.is_set, "end of own speech", VOICE, MIC_LATENESS, timeout_s)
        self.reporter.sample(VOICE, MIC_LATENESS, utterance.max_lateness_ms)

    def expect_speech_turn(self, session: VoiceSession, index: int) -> tuple[SpeechEvent, SpeechEvent]:
        """The `index`-th speech_started / speech_stopped pair of the session (server VAD)."""
        self.expect(
            session, lambda: len(session.speech_stopped) > index and len(session.speech_started) > index,
            "speech_started + speech_stopped", VOICE, FIRST_AUDIO_AFTER_STOP,
        )
        return session.speech_started[index], session.speech_stopped[index]

    def expect_reply_audio(self, session: VoiceSession, index: int, request_type: str, metric: str) -> Reply:
        """Wait for the `index`-th reply's first audio frame. A reply that ends without any (a
        failed response: a rate limit, a server error) fails its completeness at once, not the
        round trip after --reply-timeout."""
        self.expect(
            session, lambda: len(session.replies) > index and (session.replies[index].first_audio_at is not None
                                                               or session.replies[index].done_at is not None),
            "reply audio", request_type, metric,
        )
        reply = session.replies[index]
        if reply.first_audio_at is None:
            self.reporter.failure(request_type, REPLY_COMPLETENESS, f"response status {reply.status!r} with no audio")
            raise TurnAbandoned
        return reply

    def check_complete_echo(self, session: VoiceSession, reply: Reply, expected: bytes | None, what: str) -> None:
        """Wait for `response_done`; the reply must be `expected` byte for byte (the echoing mock)."""
        self.expect(session, lambda: reply.done_at is not None, "response_done", VOICE, REPLY_COMPLETENESS)
        got = reply.audio
        reply.audio = bytearray()  # checked: free it
        self.listen(reply, len(got))
        delivery_ms = (reply.last_audio_at - reply.first_audio_at) * 1000.0
        if expected is None:
            reason = f"{what}: the turn's audio is not on the client's record any more"
        elif reply.status != "completed":
            reason = f"{what}: response status {reply.status!r}"
        elif got != expected:
            reason = f"{what}: {describe_mismatch(got, expected)}"
        else:
            self.reporter.sample(VOICE, REPLY_COMPLETENESS, delivery_ms, len(got))
            return
        self.reporter.failure(VOICE, REPLY_COMPLETENESS, reason, delivery_ms, len(got))
        raise TurnAbandoned

    def vad_turn_echo(self, session: VoiceSession, started: SpeechEvent, stopped: SpeechEvent) -> bytes | None:
        """The audio a server-VAD turn committed: [speech_started.audio_ms, speech_stopped.audio_ms)."""
        end = stopped.audio_ms * BYTES_PER_MS
        expected = session.sent.slice(started.audio_ms * BYTES_PER_MS, end)
        session.sent.discard_before(end)
        return expected

    def sample_first_audio(self, reply: Reply, stopped: SpeechEvent, spoken: Utterance) -> None:
        """The VAD turn's delays to the reply's first audio: from speech_stopped, from the end of speech."""
        self.sample_delay(
            VOICE, FIRST_AUDIO_AFTER_STOP, stopped.at, reply.first_audio_at, "speech_stopped", "reply audio",
        )
        self.sample_delay(
            VOICE, AUDIO_ROUND_TRIP, spoken.last_sent_at, reply.first_audio_at, "the end of the speech was sent",
            "reply audio",
        )

    def hear_vad_reply(self, session: VoiceSession, speech_index: int, reply_index: int, spoken: Utterance) -> None:
        """After a spoken turn: speech events, the reply's first audio, and its completeness."""
        started, stopped = self.expect_speech_turn(session, speech_index)
        reply = self.expect_reply_audio(session, reply_index, VOICE, FIRST_AUDIO_AFTER_STOP)
        self.sample_first_audio(reply, stopped, spoken)
        self.check_complete_echo(
            session, reply, self.vad_turn_echo(session, started, stopped),
            f"VAD turn [{started.audio_ms}, {stopped.audio_ms}) ms",
        )


def describe_mismatch(got: bytes | bytearray, expected: bytes) -> str:
    """A short explanation of how `got` differs from `expected` (for the failures table)."""
    common = min(len(got), len(expected))
    first_difference = next((i for i in range(common) if got[i] != expected[i]), common)
    return (
        f"reply has {len(got)} bytes, expected {len(expected)} "
        f"({bytes_to_ms(len(got)):.0f} vs {bytes_to_ms(len(expected)):.0f} ms); first difference at byte "
        f"{first_difference}"
    )


class VadConversationUser(VoiceUser):
    """Server-VAD conversation: speak a clip, wait for the reply audio, repeat."""

    weight = 4

    def session_config(self) -> dict:
        return self.config_message(turn_detection="server_vad", vad=VAD_SETTINGS)

    @tag("vad")
    @task
    def conversation_turn(self) -> None:
        self.run_turn(self._turn)

    def _turn(self, session: VoiceSession) -> None:
        speech_index, reply_index = len(session.speech_stopped), len(session.replies)
        spoken = self.speak(session, self.next_clip())
        self.hear_vad_reply(session, speech_index, reply_index, spoken)


class PushToTalkUser(VoiceUser):
    """Push-to-talk (turn_detection "none"): stream a clip, commit, create_response."""

    weight = 3
    continuous_mic = False

    def session_config(self) -> dict:
        return self.config_message(turn_detection="none")

    @tag("ptt")
    @task
    def push_to_talk_turn(self) -> None:
        self.run_turn(self._turn)

    def _turn(self, session: VoiceSession) -> None:
        reply_index = len(session.replies)
        clip = self.next_clip()
        self.speak(session, clip)
        session.send_event({"type": "commit"})
        released_at = clock()
        session.send_event({"type": "create_response"})
        reply = self.expect_reply_audio(session, reply_index, VOICE, AUDIO_ROUND_TRIP_PTT)
        self.sample_delay(VOICE, AUDIO_ROUND_TRIP_PTT, released_at, reply.first_audio_at, "commit", "reply audio")
        session.sent.discard_before(session.sent.end)
        self.check_complete_echo(session, reply, clip, "push-to-talk turn")


class BargeInUser(VoiceUser):
    """Barge-in: while the reply to one clip arrives, speak the next clip over it."""

    weight = 2

    def session_config(self) -> dict:
        return self.config_message(turn_detection="server_vad", vad=VAD_SETTINGS)

    @tag("barge_in")
    @task
    def barge_in_turn(self) -> None:
        self.run_turn(self._turn)

    def _turn(self, session: VoiceSession) -> None:
        speech_index, reply_index = len(session.speech_stopped), len(session.replies)
        spoken = self.speak(session, self.next_clip())
        started, stopped = self.expect_speech_turn(session, speech_index)
        reply = self.expect_reply_audio(session, reply_index, VOICE, FIRST_AUDIO_AFTER_STOP)
        self.sample_first_audio(reply, stopped, spoken)

        # Listen to the start of the reply, then talk over it.
        gevent.sleep(max(0.0, reply.first_audio_at + self.settings.barge_in_after_ms / 1000.0 - clock()))
        overlap = session.mic.say(self.next_clip())
        self.expect(
            session, lambda: reply.interrupted is not None or len(session.replies) > reply_index + 1,
            "interrupted", VOICE, INTERRUPTED_REACTION,
        )
        if reply.interrupted is None:
            overlap_ms = bytes_to_ms(overlap.start_offset or 0)
            detected = [event.audio_ms for event in session.speech_started[speech_index + 1:]]
            self.reporter.failure(
                VOICE, INTERRUPTED_REACTION,
                f"no interrupted: the reply ({bytes_to_ms(len(reply.audio)):.0f} ms of audio, status "
                f"{reply.status!r}) was not interrupted by speech from {overlap_ms:.0f} ms on the input timeline "
                f"(speech_started at {detected} ms); the overlapping speech became a new turn",
            )
            raise TurnAbandoned
        if overlap.first_sent_at is None:  # it answers nothing the user did
            self.reporter.failure(VOICE, INTERRUPTED_REACTION,
                                  "wrong order: interrupted arrived before any overlapping speech was sent")
            raise TurnAbandoned
        self.sample_delay(VOICE, INTERRUPTED_REACTION, overlap.first_sent_at, reply.interrupted_at,
                          "the overlapping speech", "interrupted")
        self._check_interrupted_prefix(reply, self.vad_turn_echo(session, started, stopped))

        # The interrupting speech is a turn of its own: its reply must come back complete.
        self.finish_speaking(session, overlap)
        self.hear_vad_reply(session, speech_index + 1, reply_index + 1, overlap)

    def _check_interrupted_prefix(self, reply: Reply, expected: bytes | None) -> None:
        """The audio of an interrupted reply must be an exact prefix of the turn's echo, and all of
        it when `response_done` (completed) came before `interrupted`: the upstream had generated
        the whole reply and the gateway had relayed it (it stops relaying a reply at `interrupted`;
        what it sent before stays sent, in order before `response_done`). `interrupted.played_ms`
        can never exceed the audio the client received (this client sends no `playback` reports,
        so the gateway uses what it delivered or, once generation finished, the real-time
        playback position)."""
        got = bytes(reply.audio)
        reply.audio = bytearray()
        self.playback_ends_at = reply.interrupted_at  # the client drops the queued playback
        played_ms = reply.interrupted.get("played_ms")
        received_ms = bytes_to_ms(len(got))
        heard_ms = (reply.interrupted_at - reply.first_audio_at) * 1000.0
        if expected is None:
            reason = "the interrupted turn's audio is not on the client's record any more"
        elif reply.status_when_interrupted == "completed" and got != expected:
            reason = (
                "interrupted after response_done (completed), yet the reply is not the whole turn: "
                f"{describe_mismatch(got, expected)}"
            )
        elif not expected.startswith(got):
            reason = f"interrupted reply is not a prefix of the turn: {describe_mismatch(got, expected[:len(got)])}"
        elif not isinstance(played_ms, (int, float)) or not 0 <= played_ms <= received_ms + 1.0:
            reason = f"interrupted.played_ms={played_ms!r} but {received_ms:.1f} ms of audio arrived"
        else:
            self.reporter.sample(VOICE, REPLY_COMPLETENESS_INTERRUPTED, heard_ms, len(got))
            return
        self.reporter.failure(VOICE, REPLY_COMPLETENESS_INTERRUPTED, reason, heard_ms, len(got))
        raise TurnAbandoned


@functools.lru_cache(maxsize=len(TEXT_PROMPTS))
def mock_text_reply(prompt: str) -> bytes:
    """The audio the node's built-in mock speaks in reply to the text `prompt`, in the sessions'
    output format (PCM16 24 kHz): the mock's own tone for what it says ("You said: <prompt>",
    `ResponsePlanner._speech_for` in gateway/mock/responses.py), at the frequency of the options
    the node starts it with (the defaults). The voice checks assume that mock too: it echoes."""
    return spoken_tone(f"You said: {prompt}", "audio/pcm", MockOptions().text_tone_hz)


class TextTurnUser(VoiceUser):
    """Text turns: send a `text` message, receive the spoken reply."""

    weight = 1
    continuous_mic = False

    def session_config(self) -> dict:
        return self.config_message(turn_detection="none")

    @tag("text")
    @task
    def text_turn(self) -> None:
        self.run_turn(self._turn)

    def _turn(self, session: VoiceSession) -> None:
        prompt = TEXT_PROMPTS[self.turn_index % len(TEXT_PROMPTS)]
        self.turn_index += 1
        reply_index = len(session.replies)
        sent_at = clock()
        session.send_event({"type": "text", "text": prompt})
        reply = self.expect_reply_audio(session, reply_index, TEXT, TEXT_ROUND_TRIP)
        self.sample_delay(TEXT, TEXT_ROUND_TRIP, sent_at, reply.first_audio_at, "the text was sent", "reply audio")
        self.expect(session, lambda: reply.done_at is not None, "response_done", TEXT, REPLY_COMPLETENESS)
        got = bytes(reply.audio)
        reply.audio = bytearray()
        self.listen(reply, len(got))
        delivery_ms = (reply.last_audio_at - reply.first_audio_at) * 1000.0
        expected = mock_text_reply(prompt)
        if reply.status != "completed":
            reason = f"response status {reply.status!r}"
        elif got != expected:
            reason = f"not the mock's reply to {prompt!r}: {describe_mismatch(got, expected)}"
        else:
            self.reporter.sample(TEXT, REPLY_COMPLETENESS, delivery_ms, len(got))
            return
        self.reporter.failure(TEXT, REPLY_COMPLETENESS, reason, delivery_ms, len(got))
        raise TurnAbandoned
