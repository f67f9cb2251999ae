"""Tests only: a function app with one queue trigger, to test the host stand-in's queues.

The worker imports this module before it indexes the app (AIPROXY_WORKER_PRELOAD) and it
stands in for `function_app`. Each message is JSON naming what the function does with it:
"ok", "fail" (raises), "die" (the worker process exits, on the first delivery only) or
"sleep" (for `seconds`, then ok; with "first_only", on the first delivery only). Every
delivery is appended as a JSON line to the file TEST_QUEUE_LOG names: the message's id,
dequeue count, body and metadata.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import azure.functions as func

app = func.FunctionApp()
sys.modules["function_app"] = sys.modules[__name__]


@app.queue_trigger(arg_name="msg", queue_name="%TEST_QUEUE%", connection="AzureWebJobsStorage")
async def take(msg: func.QueueMessage) -> None:
    body = json.loads(msg.get_body().decode())
    seen = {
        "id": msg.id,
        "dequeue_count": msg.dequeue_count,
        "body": body,
        "pop_receipt": bool(msg.pop_receipt),
        "inserted": msg.insertion_time.isoformat() if msg.insertion_time else None,
        "expires": msg.expiration_time.isoformat() if msg.expiration_time else None,
    }
    with Path(os.environ["TEST_QUEUE_LOG"]).open("a") as log:
        log.write(json.dumps(seen) + "\n")
    action = body.get("do")
    if action == "fail":
        raise RuntimeError("asked to fail")
    if action == "die" and msg.dequeue_count == 1:
        os._exit(3)
    if action == "sleep" and (msg.dequeue_count == 1 or not body.get("first_only")):
        await asyncio.sleep(float(body["seconds"]))
