"""The proxy's request path: authenticate, authorize, choose a deployment, forward, meter.

One module per concern: `kinds` (what kind of call it is, and its rules), `bodies` (reading
requests), `call` (one call's steps, from its arrival to its usage record), `ledger` (what the
call reserves and records), `forwarding` (the
upstream request, tried on the members in order), `relays` (answers passed on as they arrive),
`streaming` (their meters), `answers` (request ids and errors), `eventinfo`, `models`,
`responses` (the Responses API and its affinity), `mcp` (MCP servers behind the
attendee's key), `realtime` (WebRTC calls' setup). The routes in function_app.py use the names
below.

May import: everything in shared/ but shared.web and shared.management.
"""

from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.pipeline.call import ProxyCall, proxy_call
from shared.pipeline.eventinfo import EventInfo, event_info
from shared.pipeline.kinds import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    EXTENSIONS_CHAT,
    IMAGES,
    RESPONSES,
    SEARCH,
    SPEECH,
    TRANSCRIPTIONS,
    TRANSLATIONS,
    CallKind,
)
from shared.pipeline.mcp import JsonRpcError, JsonRpcMessage, mcp_call
from shared.pipeline.models import Model, ModelList, list_models, one_model
from shared.pipeline.realtime import realtime_call, realtime_client_secret
from shared.pipeline.responses import by_id as response_by_id
from shared.pipeline.responses import create as create_response

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "EXTENSIONS_CHAT",
    "IMAGES",
    "REQUEST_ID_HEADER",
    "RESPONSES",
    "SEARCH",
    "SPEECH",
    "TRANSCRIPTIONS",
    "TRANSLATIONS",
    "CallKind",
    "EventInfo",
    "JsonRpcError",
    "JsonRpcMessage",
    "Model",
    "ModelList",
    "ProxyCall",
    "create_response",
    "error_response",
    "event_info",
    "list_models",
    "mcp_call",
    "new_request_id",
    "one_model",
    "proxy_call",
    "realtime_call",
    "realtime_client_secret",
    "response_by_id",
]
