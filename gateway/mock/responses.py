"""Responses of the mock: what to say (the planner) and the event ladder that says it (§7.2–§7.7).

The voice echoes: a response to an audio turn speaks exactly the committed turn's bytes; a text
turn gets a deterministic tone whose length follows the text; a function result gets a tone and
a transcript naming the output. Audio goes out in `delta_ms` pieces (the last one shorter), each
audio delta followed by its share of the transcript.

Cancellation (client `response.cancel` or VAD barge-in) happens only while the ladder task waits
between deltas, so the closing ladder knows exactly what was streamed: the transcript so far, the
audio so far (the item keeps it, for truncate), status "incomplete".

A response runs on its own configuration (`schema.response_config`): the session's, with what
its `response.create` set on top — voice, output format (the audio deltas are in it), modalities,
instructions, tools and tool choice, max_output_tokens. It is fixed when the response starts.

A response writes to the default conversation unless its `conversation` is "none" (reference
§3.4): an out-of-band response streams the same ladder with its own response_id, but its items
are never added to the conversation (no conversation.item.* events, nothing to retrieve,
truncate or delete later) and its `conversation_id` is null. Only the conversation's own
responses are one at a time; out-of-band ones run beside them (the session keeps them apart).
What a response answers is its context: its `input` when response.create gave one (items,
references to conversation items, or nothing at all), else the conversation's items.

`max_output_tokens` (the session's, or the response's own) caps a message the way OpenAI's does,
counted as the usage is (≈20 tokens per second of output audio, one per four characters of text):
output stops where the next piece would pass the cap, the audio cut inside its last delta, and the
message and response end "incomplete" with reason "max_output_tokens".
"""
from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING, Any, Optional

import orjson

from .audio import BYTES_PER_MS, GA_TO_BETA_FORMAT, new_id, tone
from .conversation import Conversation, Item, find_call, render_item
from .errors import failure_object

if TYPE_CHECKING:
    from .session import MockSession

TOKENS_PER_MINUTE_LIMIT = 40000
TEXT_TONE_MS_PER_CHAR = 60
TEXT_TONE_MIN_MS, TEXT_TONE_MAX_MS = 300, 10_000
ARGUMENT_DELTA_CHARS = 8
AUDIO_MS_PER_TOKEN = 50  # ≈20 output audio tokens per second (§3.3)
CHARS_PER_TOKEN = 4


class OutputPlan:
    """One output item to produce: a message (audio or text modality) or a function call."""

    __slots__ = ("kind", "audio", "text", "name", "call_id", "arguments")

    def __init__(self, kind: str, *, audio: bytes = b"", text: str = "", name: str = "",
                 call_id: str = "", arguments: str = "") -> None:
        self.kind = kind  # "audio" | "text" | "function_call"
        self.audio = audio
        self.text = text
        self.name = name
        self.call_id = call_id
        self.arguments = arguments


def _split(text: str, pieces: int) -> list[str]:
    """`text` cut at word boundaries into `pieces` consecutive parts (some possibly empty,
    when there are fewer words than pieces); "".join(parts) == text."""
    words = [word + " " for word in text.split(" ")]
    words[-1] = words[-1][:-1]
    n = len(words)
    return ["".join(words[i * n // pieces:(i + 1) * n // pieces]) for i in range(pieces)]


def _text_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1 if text else 0


def _usage(session: "MockSession", context: list[Item], instructions: str, output_audio_ms: int,
           output_text: str, zero: bool = False) -> dict[str, Any]:
    """Token usage: ≈10 tokens/s of input audio, 20 tokens/s of output audio (§3.3); the input
    is the instructions and the user and system messages of `context`."""
    if zero:
        in_text = in_audio = out_text = out_audio = 0
    else:
        user_audio_ms = 0
        text_chars = len(instructions)
        for item in context:
            if item.type == "message" and item.role != "assistant":
                user_audio_ms += item.audio_bytes // BYTES_PER_MS[item.audio_format]
                text_chars += sum(len(p.get("text") or "") for p in item.content)
        in_text = text_chars // CHARS_PER_TOKEN
        in_audio = user_audio_ms // 100
        out_audio = output_audio_ms // AUDIO_MS_PER_TOKEN
        out_text = _text_tokens(output_text)
    details: dict[str, Any] = {"text_tokens": in_text, "audio_tokens": in_audio}
    cached: dict[str, Any] = {"text_tokens": 0, "audio_tokens": 0}
    if session.dialect == "ga":
        details["image_tokens"] = 0
        cached["image_tokens"] = 0
    details["cached_tokens"] = 0
    details["cached_tokens_details"] = cached
    return {"total_tokens": in_text + in_audio + out_text + out_audio,
            "input_tokens": in_text + in_audio, "output_tokens": out_text + out_audio,
            "input_token_details": details,
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio}}


class Response:
    """One response: its ladder task and what it has streamed so far.

    `config` is the response's effective configuration (GA-shaped, see `schema.response_config`);
    it is never changed. `context` is what it answers (its `input`, or the conversation's items
    when it was planned). `conversation` is where its items go: the session's default
    conversation, or None for an out-of-band response (`conversation: "none"`)."""

    def __init__(self, session: "MockSession", config: dict[str, Any], context: list[Item],
                 plans: list[OutputPlan], failure: Optional[str] = None) -> None:
        self.session = session
        self.config = config
        self.context = context
        self.conversation: Optional[Conversation] = \
            None if config.get("conversation") == "none" else session.conversation
        self.max_output_tokens = config["max_output_tokens"]  # 1..4096 or "inf"
        self.limited = False  # stopped by max_output_tokens
        self.id = new_id("resp_")
        self.plans = plans
        self.modalities = list(config["output_modalities"])  # ["audio"] or ["text"]
        self.metadata = config.get("metadata")
        self.failure = failure
        self.status = "in_progress"
        self.output: list[Item] = []
        self.task: Optional[asyncio.Task[None]] = None
        self.rate_limits_sent = False
        self.first_audio_at: Optional[float] = None  # loop time of the first audio delta
        self.audio_ms = 0
        self.text_out = ""
        # progress of the item being produced (read by the closing ladder)
        self._current: Optional[Item] = None
        self._current_plan: Optional[OutputPlan] = None
        self._streamed_text = ""
        self._streamed_args = ""
        self.stream_item: Optional[Item] = None

    @property
    def output_format(self) -> str:
        """The GA type of the audio this response speaks ("audio/pcm", …)."""
        return self.config["audio"]["output"]["format"]["type"]

    def playback_end(self) -> float:
        """Loop time at which this response's audio would have finished playing for a listener
        playing it in real time from its first delta (now, if that is later or it had none)."""
        now = asyncio.get_running_loop().time()
        if self.first_audio_at is None:
            return now
        return max(now, self.first_audio_at + self.audio_ms / 1000.0)

    # ---- rendering ---------------------------------------------------------------------------

    def render(self, usage: Optional[dict[str, Any]] = None,
               status_details: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        session = self.session
        config = self.config
        out: dict[str, Any] = {
            "object": "realtime.response", "id": self.id, "status": self.status,
            "status_details": status_details,
            "output": [render_item(item, session.dialect) for item in self.output],
            "conversation_id": self.conversation.id if self.conversation is not None else None,
        }
        audio_out = config["audio"]["output"]
        if session.dialect == "ga":
            out["output_modalities"] = list(self.modalities)
            out["max_output_tokens"] = self.max_output_tokens
            out["audio"] = {"output": {"format": dict(audio_out["format"]),
                                       "voice": audio_out["voice"]}}
        else:
            out["modalities"] = ["text", "audio"] if "audio" in self.modalities else ["text"]
            out["voice"] = audio_out["voice"]
            out["output_audio_format"] = GA_TO_BETA_FORMAT[audio_out["format"]["type"]]
            out["temperature"] = config["_beta"]["temperature"]
            out["max_output_tokens"] = self.max_output_tokens
        out["usage"] = usage
        out["metadata"] = self.metadata
        return out

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        session = self.session
        session.send_event("response.created", response=self.render())
        if self.failure is not None:
            self.status = "failed"
            error = failure_object(self.failure, model=session.model, session_id=session.id,
                                   requested=1200)
            self._done(usage=_usage(session, [], "", 0, "", zero=True),
                       status_details={"type": "failed", "error": error})
            return
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            for index, plan in enumerate(self.plans):
                if plan.kind == "function_call":
                    await self._function_call(index, plan)
                else:
                    await self._message(index, plan)
                if self.limited:
                    break
            self.status = "incomplete" if self.limited else "completed"
            details = {"type": "incomplete", "reason": "max_output_tokens"} if self.limited else None
            self._done(usage=self._usage(), status_details=details)
        except asyncio.CancelledError:
            pass  # cancel() already wrote the closing ladder

    def _usage(self, output_text: Optional[str] = None) -> dict[str, Any]:
        """The usage of what was streamed (`output_text`: the text, when not `text_out`)."""
        return _usage(self.session, self.context, self.config["instructions"], self.audio_ms,
                      self.text_out if output_text is None else output_text)

    def _add_item(self, index: int, item: Item) -> None:
        session = self.session
        conversation = self.conversation
        self._current = item
        self.output.append(item)
        rendered = render_item(item, session.dialect)
        session.send_event("response.output_item.added", response_id=self.id, output_index=index,
                           item=rendered)
        if conversation is not None:
            session.send_event("conversation.item.added", previous_item_id=conversation.add(item),
                               item=rendered)

    def _finish_item(self, index: int, item: Item, status: str) -> None:
        session = self.session
        conversation = self.conversation
        item.status = status
        rendered = render_item(item, session.dialect)
        session.send_event("response.output_item.done", response_id=self.id, output_index=index,
                           item=rendered)
        if conversation is not None:
            session.send_event("conversation.item.done",
                               previous_item_id=conversation.previous_of(item.id)
                               if item.id in conversation else None, item=rendered)
        self._current = None
        self._current_plan = None

    def _send_rate_limits(self) -> None:
        if self.rate_limits_sent:
            return
        self.rate_limits_sent = True
        used = self.audio_ms // 50 + len(self.text_out) // 4 + 1
        remaining = max(0, TOKENS_PER_MINUTE_LIMIT - used)
        tokens = {"name": "tokens", "limit": TOKENS_PER_MINUTE_LIMIT, "remaining": remaining,
                  "reset_seconds": round(60.0 * used / TOKENS_PER_MINUTE_LIMIT, 3)}
        limits = [tokens] if self.session.dialect == "ga" else [
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012}, tokens]
        self.session.send_event("rate_limits.updated", rate_limits=limits)

    def _room(self, audio_ms: int = 0, text: str = "") -> float:
        """Output tokens left under max_output_tokens once `audio_ms` more audio and `text` more
        text are out (negative: that would pass the cap)."""
        if self.max_output_tokens == "inf":
            return float("inf")
        spent = (self.audio_ms + audio_ms) // AUDIO_MS_PER_TOKEN \
            + _text_tokens(self.text_out + self._streamed_text + text)
        return self.max_output_tokens - spent

    async def _pace(self, sent_ms: int, started: float) -> None:
        """Between deltas: realtime pacing waits until `sent_ms` of audio is due; fast pacing
        only yields (so barge-in and cancel can land) and respects write backpressure."""
        session = self.session
        if session.options.pacing == "realtime":
            delay = started + sent_ms / 1000.0 - time.monotonic()
            await asyncio.sleep(delay if delay > 0 else 0)
        else:
            await asyncio.sleep(0)
        await session.writable()

    async def _message(self, index: int, plan: OutputPlan) -> None:
        session = self.session
        audio_mode = plan.kind == "audio"
        content_type = "output_audio" if audio_mode else "output_text"
        text_field = "transcript" if audio_mode else "text"
        item = Item(new_id("item_"), "message", role="assistant", status="in_progress",
                    audio_format=self.output_format)
        self._current_plan = plan
        self._streamed_text = ""
        self._add_item(index, item)
        item.content.append({"type": content_type, text_field: ""})
        ids = {"response_id": self.id, "item_id": item.id, "output_index": index, "content_index": 0}
        session.send_event("response.content_part.added", **ids,
                           part={"type": "audio" if audio_mode else "text", text_field: ""})
        if audio_mode:
            bytes_per_ms = BYTES_PER_MS[self.output_format]
            delta_bytes = session.options.delta_ms * bytes_per_ms
            chunks = [plan.audio[i:i + delta_bytes] for i in range(0, len(plan.audio), delta_bytes)]
            pieces = _split(plan.text, max(1, len(chunks)))
            started = time.monotonic()
            sent_ms = 0
            for chunk, piece in zip(chunks, pieces):
                chunk_ms = len(chunk) // bytes_per_ms
                if self._room(chunk_ms, piece) < 0:
                    # the cap falls inside this delta: as much of its audio as still fits, no
                    # more text
                    self.limited = True
                    fits_ms = int(self._room()) * AUDIO_MS_PER_TOKEN - self.audio_ms % AUDIO_MS_PER_TOKEN
                    if fits_ms < chunk_ms:
                        chunk = chunk[:max(0, fits_ms) * bytes_per_ms]
                    piece = ""
                if chunk:
                    if self.first_audio_at is None:
                        self.first_audio_at = asyncio.get_running_loop().time()
                    session.send_event("response.output_audio.delta", **ids,
                                       delta=base64.b64encode(chunk).decode())
                    item.audio += chunk
                    session.voice_locked = True
                    sent_ms += len(chunk) // bytes_per_ms
                    self.audio_ms += len(chunk) // bytes_per_ms
                if piece:
                    session.send_event("response.output_audio_transcript.delta", **ids, delta=piece)
                    self._streamed_text += piece
                    item.content[0]["transcript"] = self._streamed_text
                if self.limited:
                    break
                await self._pace(sent_ms, started)
            if not chunks and plan.text:
                session.send_event("response.output_audio_transcript.delta", **ids, delta=plan.text)
                self._streamed_text = plan.text
        else:
            words = plan.text.split(" ")
            for position, word in enumerate(words):
                piece = word if position == len(words) - 1 else word + " "
                if self._room(0, piece) < 0:
                    self.limited = True
                    break
                session.send_event("response.output_text.delta", **ids, delta=piece)
                self._streamed_text += piece
                item.content[0]["text"] = self._streamed_text
                await self._pace(0, 0.0)
        self._send_rate_limits()
        self._close_message(index, item, "incomplete" if self.limited else "completed")

    def _close_message(self, index: int, item: Item, status: str) -> None:
        session = self.session
        ids = {"response_id": self.id, "item_id": item.id, "output_index": index, "content_index": 0}
        text = self._streamed_text
        self.text_out += text
        if item.content and item.content[0]["type"] == "output_audio":
            item.content[0]["transcript"] = text
            session.send_event("response.output_audio.done", **ids)
            session.send_event("response.output_audio_transcript.done", **ids, transcript=text)
            session.send_event("response.content_part.done", **ids,
                               part={"type": "audio", "transcript": text})
        else:
            item.content[0]["text"] = text
            session.send_event("response.output_text.done", **ids, text=text)
            session.send_event("response.content_part.done", **ids, part={"type": "text", "text": text})
        self._finish_item(index, item, status)

    async def _function_call(self, index: int, plan: OutputPlan) -> None:
        session = self.session
        item = Item(new_id("item_"), "function_call", status="in_progress", name=plan.name,
                    call_id=plan.call_id, arguments="")
        self._current_plan = plan
        self._streamed_args = ""
        self._add_item(index, item)
        ids = {"response_id": self.id, "item_id": item.id, "output_index": index,
               "call_id": plan.call_id}
        args = plan.arguments
        for start in range(0, len(args), ARGUMENT_DELTA_CHARS):
            piece = args[start:start + ARGUMENT_DELTA_CHARS]
            session.send_event("response.function_call_arguments.delta", **ids, delta=piece)
            self._streamed_args += piece
            item.arguments = self._streamed_args
            await self._pace(0, 0.0)
        self._send_rate_limits()
        self._close_call(index, item, "completed")

    def _close_call(self, index: int, item: Item, status: str) -> None:
        item.arguments = self._streamed_args
        self.text_out += item.arguments  # the model wrote them: output text tokens in the usage
        self.session.send_event("response.function_call_arguments.done", response_id=self.id,
                                item_id=item.id, output_index=index, call_id=item.call_id,
                                name=item.name, arguments=item.arguments)
        self._finish_item(index, item, status)

    def cancel(self, reason: str) -> None:
        """Stop generating: closing ladder for the item in progress (only what was streamed,
        status "incomplete"), then response.done "cancelled" with `reason`."""
        if self.status != "in_progress":
            return
        if self.task is not None:
            self.task.cancel()
        item = self._current
        if item is not None:
            index = self.output.index(item)
            if item.type == "function_call":
                self._close_call(index, item, "incomplete")
            else:
                self._close_message(index, item, "incomplete")
        self.status = "cancelled"
        self._done(usage=self._usage(), status_details={"type": "cancelled", "reason": reason})

    def abandon(self) -> None:
        """The connection is gone: stop without sending anything."""
        self.status = "cancelled"
        if self.task is not None:
            self.task.cancel()

    def _done(self, usage: dict[str, Any], status_details: Optional[dict[str, Any]]) -> None:
        self.session.send_event("response.done", response=self.render(usage, status_details))
        self.session.response_finished(self)

    # ---- stream echo mode (see session.StreamEcho) ------------------------------------------

    def stream_progress(self, audio_bytes: int) -> None:
        """Account one stream-echo delta (the echo can run for hours: no audio is kept)."""
        self.audio_ms += audio_bytes // BYTES_PER_MS[self.output_format]

    def finish_stream(self, status: str, transcript: str) -> None:
        item = self.stream_item
        assert item is not None
        self._current = item
        self._streamed_text = transcript
        self._send_rate_limits()
        self._close_message(0, item, "completed" if status == "completed" else "incomplete")
        self.status = status
        details = None if status == "completed" else {"type": "cancelled", "reason": "client_cancelled"}
        self._done(usage=self._usage(self._streamed_text), status_details=details)


def stream_response(session: "MockSession") -> Response:
    """Open the long-lived response of echo_mode="stream": response.created, output item
    added, content part added. Deltas are then sent by `StreamEcho`."""
    response = Response(session, session.config, session.conversation.items(), [])
    response.modalities = ["audio"]  # the echo speaks whatever the session's modalities
    session.send_event("response.created", response=response.render())
    item = Item(new_id("item_"), "message", role="assistant", status="in_progress",
                audio_format=session.output_format)
    response.stream_item = item
    response._add_item(0, item)
    item.content.append({"type": "output_audio", "transcript": ""})
    session.send_event("response.content_part.added", response_id=response.id, item_id=item.id,
                       output_index=0, content_index=0, part={"type": "audio", "transcript": ""})
    return response


class ResponsePlanner:
    """Decides what a response says, from its context (the conversation, or its own `input`)
    and its tools."""

    def __init__(self, session: "MockSession") -> None:
        self.session = session

    def plan(self, config: dict[str, Any], input_items: Optional[list[Item]] = None) -> Response:
        """The response to run on `config` (its effective configuration), answering
        `input_items` (its response.create's `input`, resolved) or, when None, the conversation."""
        session = self.session
        options = session.options
        failure = None
        if options.fail_responses is not None and session.responses_created % options.fail_every_n == 0:
            failure = options.fail_responses
        context = session.conversation.items() if input_items is None else input_items
        source = _source_item(context)
        calls = self._function_calls_for(source, config)
        if calls:
            plans = calls
        else:
            fmt = config["audio"]["output"]["format"]["type"]
            plans = _items_of(self._speech_for(source, context, config["output_modalities"][0], fmt),
                              options.reply_item_ms * BYTES_PER_MS[fmt])
        return Response(session, config, context, plans, failure)

    def _function_calls_for(self, source: Optional[Item], config: dict[str, Any]) -> list[OutputPlan]:
        """The calls a response makes with the tools and `tool_choice` of its `config`: one per
        tool a text turn names (in the order named; a response may hold several, each its own
        output item), else per `tool_choice`/options."""
        session = self.session
        options = session.options
        tools = [t for t in config["tools"] if t.get("type", "function") == "function"]
        choice = config["tool_choice"]
        if not tools or choice == "none" or source is None or source.type != "message":
            return []
        chosen: list[dict[str, Any]] = []
        if isinstance(choice, dict) and choice.get("type") == "function":
            chosen = [t for t in tools if t["name"] == choice.get("name")][:1]
        elif choice == "required":
            chosen = tools[:1]
        else:
            text = " ".join(p.get("text") or "" for p in source.content if p["type"] == "input_text")
            if text and options.function_trigger == "name_in_text":
                named = [(text.find(t["name"]), index) for index, t in enumerate(tools) if t["name"] in text]
                chosen = [tools[index] for _, index in sorted(named)]
            elif source.audio_bytes and options.function_every_n_audio_turns > 0 \
                    and session.audio_turns % options.function_every_n_audio_turns == 0:
                chosen = tools[:1]
        return [OutputPlan("function_call", name=tool["name"], call_id=new_id("call_", 16),
                           arguments=orjson.dumps(_arguments_for(tool)).decode()) for tool in chosen]

    def _speech_for(self, source: Optional[Item], context: list[Item], modality: str,
                    fmt: str) -> OutputPlan:
        """What to say to `source` (the newest input of `context`), its audio (if any) in
        format `fmt`."""
        session = self.session
        if source is not None and source.type == "message" and source.audio_bytes:
            duration_ms = source.audio_bytes // BYTES_PER_MS[source.audio_format]
            text = f"echo of {duration_ms} ms"
            if source.audio_format == fmt and source.audio:
                audio = bytes(source.audio)  # the echo: the user's turn, bit-exactly
            else:  # another format, or an old turn whose audio the conversation let go of
                audio = tone(duration_ms, fmt, session.options.text_tone_hz)
        else:
            if source is None:
                text = "Hello, how can I help?"
            elif source.type == "function_call_output":
                call = find_call(context, source.call_id or "")
                name = call.name if call is not None else "function"
                text = f"The {name} function returned {source.output}"
            else:
                said = " ".join(p.get("text") or "" for p in source.content
                                if p["type"] == "input_text")
                text = f"You said: {said}"
            audio = spoken_tone(text, fmt, session.options.text_tone_hz)
        if modality == "text":
            return OutputPlan("text", text=text)
        return OutputPlan("audio", audio=audio, text=text)


def _source_item(context: list[Item]) -> Optional[Item]:
    """The newest input a response answers in its `context`: the latest user message or
    function output (assistant and system items after it do not change what is answered)."""
    for item in reversed(context):
        if item.type == "function_call_output" or (item.type == "message" and item.role == "user"):
            return item
    return None


def spoken_tone(text: str, fmt: str, hz: float) -> bytes:
    """The mock's voice saying `text`: a tone whose length follows the text's (deterministic,
    so a load test can check a reply bit-exactly)."""
    duration_ms = min(TEXT_TONE_MAX_MS, max(TEXT_TONE_MIN_MS, TEXT_TONE_MS_PER_CHAR * len(text)))
    return tone(duration_ms, fmt, hz)


def _items_of(plan: OutputPlan, item_bytes: int) -> list[OutputPlan]:
    """A spoken reply as the message items it is said in: one, or, with `item_bytes` > 0,
    consecutive slices of its audio of at most that size, each with its share of the text."""
    if plan.kind != "audio" or item_bytes <= 0 or len(plan.audio) <= item_bytes:
        return [plan]
    slices = [plan.audio[i:i + item_bytes] for i in range(0, len(plan.audio), item_bytes)]
    return [OutputPlan("audio", audio=audio, text=text)
            for audio, text in zip(slices, _split(plan.text, len(slices)))]


def _arguments_for(tool: dict[str, Any]) -> dict[str, Any]:
    """Deterministic arguments from the tool's JSON schema: strings "<name> 1", numbers 1,
    booleans true, anything else null."""
    parameters = tool.get("parameters") or {}
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    args: dict[str, Any] = {}
    for name, schema in (properties or {}).items():
        kind = schema.get("type") if isinstance(schema, dict) else None
        if kind == "string":
            enum_values = schema.get("enum")
            args[name] = enum_values[0] if enum_values else f"{name} 1"
        elif kind in ("number", "integer"):
            args[name] = 1
        elif kind == "boolean":
            args[name] = True
        else:
            args[name] = None
    return args
