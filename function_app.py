"""The Function app: one HTTP function per route of the route table, the timers, and the
queue function that meters realtime calls.

The routes, their methods and handlers are declared once, in shared/management/routes.py.
"""

from __future__ import annotations

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response

from shared import plugins
from shared.management import maintenance
from shared.management.routes import ROUTES
from shared.management.routing import Route
from shared.pipeline import sideband
from shared.platform import telemetry
from shared.runtime import get_runtime

telemetry.set_log_levels()
plugins.check()  # a plugin that cannot be loaded stops start-up here, named, with the reason
app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


def serve(route: Route) -> None:
    """Register one route as an HTTP function; the worker indexes it by its name."""

    async def function(req: Request) -> Response:
        return await route.handle(req)

    trigger = app.route(route=route.path, methods=list(route.methods), auth_level=route.auth_level)
    app.function_name(route.name)(trigger(function))


for _route in ROUTES:
    serve(_route)


# --- timers: usage rollups and retention --------------------------------------------------


@app.timer_trigger(schedule="%AIPROXY_ROLLUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def rollup_usage(timer: func.TimerRequest) -> None:
    await maintenance.roll_up_usage(get_runtime())


@app.timer_trigger(schedule="%AIPROXY_RETENTION_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def prune_usage(timer: func.TimerRequest) -> None:
    await maintenance.prune_usage(get_runtime())


# --- realtime calls: each held through its sideband for its life, metered ---------------------


@app.queue_trigger(
    arg_name="msg", queue_name="%AIPROXY_REALTIME_QUEUE%", connection="AzureWebJobsStorage"
)
async def meter_realtime_call(msg: func.QueueMessage) -> None:
    await sideband.meter(get_runtime(), msg.get_body())
