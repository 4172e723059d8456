"""The mock's error catalogue: one table from a name to the wire `error` object (reference §8).

Every `error` event the mock sends is built here, so codes, types and message texts live in
one place. Messages are `str.format` templates filled from keyword arguments.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional


class ErrorSpec(NamedTuple):
    type: str
    code: Optional[str]
    message: str


ERRORS: dict[str, ErrorSpec] = {
    # handshake / fatal
    "invalid_api_key": ErrorSpec(
        "invalid_request_error", "invalid_api_key",
        "Incorrect API key provided: {masked_key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."),
    "missing_auth": ErrorSpec(
        "invalid_request_error", None,
        "Missing bearer or basic authentication in header"),
    "beta_api_shape_disabled": ErrorSpec(
        "invalid_request_error", "beta_api_shape_disabled",
        "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."),
    "session_expired": ErrorSpec(
        "invalid_request_error", "session_expired",
        "Your session hit the maximum duration of {minutes} minutes."),
    # malformed events
    "invalid_event_missing_type": ErrorSpec(
        "invalid_request_error", "invalid_event", "The 'type' field is missing."),
    "invalid_json": ErrorSpec(
        "invalid_request_error", "invalid_event",
        "The event could not be parsed as a JSON object: {detail}"),
    "unknown_event_type": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid value: '{value}'. Supported values are: {supported}."),
    # parameters
    "unknown_parameter": ErrorSpec(
        "invalid_request_error", "unknown_parameter", "Unknown parameter: '{param}'."),
    "missing_required_parameter": ErrorSpec(
        "invalid_request_error", "missing_required_parameter",
        "Missing required parameter: '{param}'."),
    "invalid_enum": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid value: {value}. Supported values are: {supported}."),
    "invalid_type": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid type for '{param}': expected {expected}, but got {got} instead."),
    "value_below_min": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid '{param}': {kind} below minimum value. Expected a value >= {limit}, "
        "but got {value} instead."),
    "value_above_max": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid '{param}': {kind} above maximum value. Expected a value <= {limit}, "
        "but got {value} instead."),
    "model_change": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Cannot update a session's model. Connect a new session to use model '{value}'."),
    "cannot_update_voice": ErrorSpec(
        "invalid_request_error", "cannot_update_voice",
        "Cannot update a conversation's voice if assistant audio is present."),
    "invalid_modalities": ErrorSpec(
        # beta `modalities` without "text" (wire text as OpenAI's beta server gave it,
        # relayed verbatim in BerriAI/litellm#14887)
        "invalid_request_error", "invalid_value",
        "Invalid modalities: {value}. Supported combinations are: ['text'] and ['audio', 'text']."),
    "tracing_immutable": ErrorSpec(
        # reference §4.1 says only "immutable once on"; the wording follows cannot_update_voice
        "invalid_request_error", "invalid_value",
        "Cannot update a session's tracing configuration once tracing is enabled."),
    "transcription_update_on_realtime": ErrorSpec(
        "invalid_request_error", None,
        "Passing a transcription session update event to a realtime session is not allowed."),
    # input audio buffer
    "invalid_audio": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid 'audio'. Expected base64-encoded audio bytes ({format_desc}) but got an "
        "invalid value."),
    "append_too_large": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Invalid 'audio': string too long. Expected a string with maximum length {limit}, "
        "but got a string with length {length} instead."),
    "input_audio_buffer_commit_empty": ErrorSpec(
        "invalid_request_error", "input_audio_buffer_commit_empty",
        "Error committing input audio buffer: buffer too small. Expected at least 100ms of "
        "audio, but buffer only has {ms:.2f}ms of audio."),
    # responses
    "conversation_already_has_active_response": ErrorSpec(
        "invalid_request_error", "conversation_already_has_active_response",
        "Conversation already has an active response in progress: {response_id}. Wait until "
        "the response is finished before creating a new one."),
    "response_cancel_not_active": ErrorSpec(
        "invalid_request_error", "response_cancel_not_active",
        "Cancellation failed: no active response found"),
    # conversation items
    "item_truncate_invalid_item_id": ErrorSpec(
        "invalid_request_error", "item_truncate_invalid_item_id",
        "Error truncating item: the item with id '{item_id}' does not exist."),
    "truncate_not_audio": ErrorSpec(
        "invalid_request_error", None, "Only model output audio messages can be truncated"),
    "truncate_too_long": ErrorSpec(
        "invalid_request_error", None,
        "Audio content of {have_ms}ms is already shorter than {want_ms}ms"),
    "item_retrieve_invalid_item_id": ErrorSpec(
        "invalid_request_error", "item_retrieve_invalid_item_id",
        "Error retrieving item: the item with id '{item_id}' does not exist."),
    "item_delete_invalid_item_id": ErrorSpec(
        "invalid_request_error", "item_delete_invalid_item_id",
        "Error deleting item: the item with id '{item_id}' does not exist."),
    "invalid_tool_call_id": ErrorSpec(
        "invalid_request_error", "invalid_tool_call_id",
        "Tool call ID '{call_id}' not found in conversation."),
    "duplicate_item_id": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Item with id '{item_id}' already exists."),
    "previous_item_not_found": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "Error adding item: the previous item with id '{item_id}' does not exist."),
    "item_reference_not_found": ErrorSpec(
        # a response.create `input` item_reference to no conversation item; the reference
        # has no wire text, so this is the Responses API's for an unknown input item
        "invalid_request_error", "invalid_value", "Item with id '{item_id}' not found."),
    "internal_error": ErrorSpec(
        "server_error", None,
        "The server had an error while processing your event ({detail}). Sorry about that!"),
    "message_too_big": ErrorSpec(
        "invalid_request_error", "invalid_value",
        "The event is larger than the maximum allowed size of {limit} bytes."),
}

# Failures reported inside `response.done` (status "failed"), reference §7.7.
RESPONSE_FAILURES: dict[str, ErrorSpec] = {
    "rate_limit_exceeded": ErrorSpec(
        "tokens", "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-mock on tokens per min (TPM): "
        "Limit 40000, Used 40000, Requested {requested}. Please try again in 1.5s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more."),
    "server_error": ErrorSpec(
        "server_error", None,
        "The server had an error while processing your request. Sorry about that! You can "
        "retry your request, or contact us through our help center at help.openai.com if the "
        "error persists. (include session ID in your message: {session_id}). We recommend you "
        "retry your request."),
    "insufficient_quota": ErrorSpec(
        "insufficient_quota", "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors."),
    "model_not_found": ErrorSpec(
        "invalid_request_error", "model_not_found",
        "The model `{model}` does not exist or you do not have access to it."),
}


class MockProtocolError(Exception):
    """A client event was rejected: carries the catalogue name, the `param` and the fields
    for the message template. Raised by validators, turned into an `error` event by the session."""

    def __init__(self, name: str, param: Optional[str] = None, **fields: Any) -> None:
        super().__init__(name)
        self.name = name
        self.param = param
        self.fields = fields


def error_object(name: str, param: Optional[str] = None, client_event_id: Optional[str] = None,
                 **fields: Any) -> dict[str, Any]:
    """The `error` member of an `error` event (reference §3.2)."""
    spec = ERRORS[name]
    if param is not None:
        fields.setdefault("param", param)
    return {
        "type": spec.type,
        "code": spec.code,
        "message": spec.message.format(**fields),
        "param": param,
        "event_id": client_event_id,
    }


def failure_object(name: str, **fields: Any) -> dict[str, Any]:
    """`status_details.error` of a failed `response.done`."""
    spec = RESPONSE_FAILURES[name]
    return {"type": spec.type, "code": spec.code, "message": spec.message.format(**fields)}


def close_reason(name: str) -> bytes:
    """Close-frame reason for a fatal error: `<error.type>.<error.code>` (reference §2.2)."""
    spec = ERRORS[name]
    return f"{spec.type}.{spec.code}".encode() if spec.code else spec.type.encode()


def mask_key(key: str) -> str:
    """Mask a key the way OpenAI's REST errors do, never echoing it whole."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]
