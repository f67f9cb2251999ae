"""The proxy's request path: authenticate, authorize, choose a deployment, forward, meter.

One module per concern: `operations` (what a kind of call is), `bodies` (reading requests),
`forwarding` (members tried in order, failover), `call` (one call from arrival to its usage
record), `relays` (streams passed on as they arrive), `answers` (request ids and errors),
`eventinfo`, `models`. The routes in function_app.py use the names below.
"""

from shared.pipeline.answers import REQUEST_ID_HEADER, error_response, new_request_id
from shared.pipeline.call import Call, proxy
from shared.pipeline.eventinfo import event_info
from shared.pipeline.models import list_models, one_model
from shared.pipeline.operations import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    EXTENSIONS_CHAT,
    IMAGES,
    SEARCH,
    TRANSCRIPTIONS,
    Operation,
)

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "EXTENSIONS_CHAT",
    "IMAGES",
    "REQUEST_ID_HEADER",
    "SEARCH",
    "TRANSCRIPTIONS",
    "Call",
    "Operation",
    "error_response",
    "event_info",
    "list_models",
    "new_request_id",
    "one_model",
    "proxy",
]
