"""The proxy's request path: authenticate, authorize, choose a deployment, forward, meter.

One module per concern: `operations` (what a kind of call is), `bodies` (reading requests),
`forwarding` (members tried in order, failover), `call` (one call from arrival to its usage
record), `relays` (streams passed on as they arrive), `streaming` (their meters), `answers`
(request ids and errors), `eventinfo`, `models`, `responses` (the Responses API and its
affinity). The routes in function_app.py use the names below.

May import: everything in shared/ but shared.web and shared.management.
"""

from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.pipeline.call import Call, proxy
from shared.pipeline.eventinfo import EventInfo, event_info
from shared.pipeline.models import Model, ModelList, list_models, one_model
from shared.pipeline.operations import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    EXTENSIONS_CHAT,
    IMAGES,
    SEARCH,
    SPEECH,
    TRANSCRIPTIONS,
    TRANSLATIONS,
    Operation,
)
from shared.pipeline.responses import by_id as response_by_id
from shared.pipeline.responses import create as create_response

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "EXTENSIONS_CHAT",
    "IMAGES",
    "REQUEST_ID_HEADER",
    "SEARCH",
    "SPEECH",
    "TRANSCRIPTIONS",
    "TRANSLATIONS",
    "Call",
    "EventInfo",
    "Model",
    "ModelList",
    "Operation",
    "create_response",
    "error_response",
    "event_info",
    "list_models",
    "new_request_id",
    "one_model",
    "proxy",
    "response_by_id",
]
