"""Plugins: an operator's own request checks and usage sinks, without forking the app.

Plugins are named in `AIPROXY_PLUGINS` (a shipped name, or `module:attribute` importable from
the app, either of them as `alias=...`), each configured by the JSON object in its setting
`AIPROXY_PLUGIN_<NAME>`, and created once per process with its Runtime. A plugin is any object
with one or both hooks:

- `on_request(context, body)`: every model call, once its key, its event's window, its
  deployment and its max-token cap are checked, before the daily caps and per-minute limits
  are taken and a deployment member is chosen. It returns None (nothing changed) or the body to
  forward (which the caps then count), or raises `Refusal` to answer the caller with a contract
  error. A hook has `AIPROXY_PLUGINS_REQUEST_BUDGET_MS`: an async one is stopped there, a plain
  one runs in a thread of its own pool and its call stops waiting for it there; a failed or
  stopped hook refuses the call (`503 plugin_failed`) unless the plugin is `fail_open`.
- `on_usage(records)`: every usage record this process makes, in batches, from a bounded queue
  of its own, off the request path (shared/plugins/sinks.py).

Shipped: `wordfilter`, `csv_usage`, `webhook_usage` (modules of this package). docs/plugins.md.

May import: shared.errors, shared.platform.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import STATUS_BY_CODE, ProxyError
from shared.platform import settings as settings_module
from shared.platform.settings import Settings
from shared.plugins.sinks import Sink

log = logging.getLogger(__name__)

SHIPPED = {
    "wordfilter": "shared.plugins.wordfilter:WordFilter",
    "csv_usage": "shared.plugins.csv_usage:CsvUsage",
    "webhook_usage": "shared.plugins.webhook_usage:WebhookUsage",
}
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
# What storage needs and sinks do not: a record's table keys.
_STORAGE_KEYS = frozenset({"PartitionKey", "RowKey"})
# Threads for plain request hooks. A hook still running past its budget holds one (a thread
# cannot be stopped); once all are held, calls wait for one and are refused at their budget,
# while every call without plain hooks goes on.
REQUEST_THREADS = 8
_request_threads = ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="plugin-request")
Screened = tuple[dict[str, Any], bytes]  # a body a hook returned, and its JSON


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a request hook knows of the call besides its body (read-only)."""

    request_id: str
    event_id: str
    attendee_id: str
    user: str
    operation: str  # chat/completions, completions, embeddings, responses, images/generations, …
    model_class: str  # openai-chat, openai-embeddings, … (the catalog's classes)
    deployment: str


class Refusal(Exception):
    """Raised by a request hook to refuse the call with a contract error (a 4xx code of
    shared/errors.py; `content_filter` by default, a 400 as Azure answers its own filter)."""

    def __init__(self, message: str, *, code: str = "content_filter", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class Plugin:
    """A convenient base (any object with `on_request` and/or `on_usage` will do).

    `__init__` gets the plugin's JSON config, checks it (raise ValueError saying what is wrong)
    and opens nothing: the app also builds each plugin once at start-up only to check it. Open
    files and connections on first use and release them in `close`. The loader sets `name`.

    Hooks may be plain or async. A plain `on_request` runs in a thread (REQUEST_THREADS of them
    per process), so it does not hold other calls while it works, as long as it lets go of the
    GIL: Python code does, between steps; C code that holds it (the `re` module matching)
    freezes the process until it returns, so match with `regex` and a timeout, as the word
    filter does. A plain `on_usage` runs in a thread too.
    """

    name = ""
    fail_open = False  # a failed or stopped request hook lets the call pass (unchanged by it)
    attempts = 1  # tries per usage batch (more: retried with backoff, doubling to 30 s)
    retry_seconds = 0.5  # the first backoff
    queue_size = 10_000  # records waiting for this sink; beyond, records are counted and skipped
    batch_size = 100  # most records per on_usage call
    batch_seconds = 0.0  # how long a record may wait for others to fill its batch
    keys: frozenset[str] | None = None  # the config's keys it knows; others are refused

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        unknown = sorted(set(config) - self.keys) if self.keys is not None else []
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(self.keys or ())}")

    async def close(self) -> None:
        """Release what the plugin opened (the app is stopping or its runtime was replaced)."""


class PluginError(Exception):
    """A plugin that cannot be loaded; the message names it and says why."""


class RequestHook:
    """One plugin's `on_request`, within its time budget and failure rules."""

    def __init__(self, name: str, plugin: Any, budget_seconds: float) -> None:
        self.name = name
        self.run = plugin.on_request
        self.awaits = inspect.iscoroutinefunction(self.run)
        self.fail_open = bool(getattr(plugin, "fail_open", False))
        self.budget = budget_seconds
        self.failures = 0

    async def apply(self, context: RequestContext, body: dict[str, Any]) -> Screened | None:
        """The body this hook returns, with its JSON (None: unchanged); raises the caller's
        ProxyError."""
        before = orjson.dumps(body) if self.fail_open else b""  # hooks may change it in place
        scope: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(self.budget) as scope:
                if self.awaits:
                    result = await self.run(context, body)
                else:  # off the event loop: a slow hook holds its own call only
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(_request_threads, self.run, context, body)
        except Refusal as refusal:
            return self._refused(refusal, context, before)
        except Exception as exc:
            stopped = scope is not None and scope.expired()
            reason = f"did not finish within {self.budget * 1000:.0f} ms" if stopped else "failed"
            return self._failed(reason, exc, context, before)
        if result is None:
            return None
        if isinstance(result, dict):
            try:
                return result, orjson.dumps(result)
            except TypeError as exc:
                problem = TypeError(f"returned a body that is not JSON: {exc}")
                return self._failed("failed", problem, context, before)
        return self._failed(
            "failed", TypeError(f"returned {type(result).__name__}, not a dict or None"),
            context, before,
        )  # fmt: skip

    def _refused(self, refusal: Refusal, context: RequestContext, before: bytes) -> Screened:
        status = STATUS_BY_CODE.get(refusal.code, 0)
        if not 400 <= status < 500:
            problem = ValueError(f"refused with {refusal.code!r}, not a 4xx code of the contract")
            return self._failed("failed", problem, context, before)
        raise ProxyError(refusal.code, refusal.message, param=refusal.param)

    def _failed(
        self, reason: str, exc: BaseException, context: RequestContext, before: bytes
    ) -> Screened:
        self.failures += 1
        log.error(
            "plugin %s: request hook %s on request %s (%s: %s); %s",
            self.name, reason, context.request_id, type(exc).__name__, exc,
            "the call goes on without it" if self.fail_open else "the call is refused",
            exc_info=exc if self.failures == 1 and not isinstance(exc, TimeoutError) else None,
        )  # fmt: skip
        if self.fail_open:
            return orjson.loads(before), before
        raise ProxyError(
            "plugin_failed",
            f"The proxy's request check '{self.name}' {reason}, so the call was not sent. "
            "Retry in a moment; if it keeps happening, tell the event's organiser.",
            headers={"Retry-After": "1"},
        )


class Plugins:
    """The plugins of one process: request hooks in the configured order, and usage sinks."""

    def __init__(
        self,
        loaded: list[tuple[str, Any]],
        request_budget_seconds: float = 0.25,
        usage_budget_seconds: float = 10.0,
    ) -> None:
        self.loaded = loaded
        self.requests = tuple(
            RequestHook(name, plugin, request_budget_seconds)
            for name, plugin in loaded
            if callable(getattr(plugin, "on_request", None))
        )
        self.sinks = tuple(
            Sink(name, plugin, usage_budget_seconds)
            for name, plugin in loaded
            if callable(getattr(plugin, "on_usage", None))
        )

    async def screen(self, context: RequestContext, body: dict[str, Any]) -> Screened | None:
        """The body after every request hook and its JSON, or None when none changed it;
        raises ProxyError for a refusal, or for a hook that failed and is not fail_open."""
        changed = None
        for hook in self.requests:
            result = await hook.apply(context, body)
            if result is not None:
                changed = result
                body = result[0]
        return changed

    @property
    def observer(self) -> Any:
        """What the usage writer calls with each record, or None when no plugin wants them."""
        return self.offer if self.sinks else None

    def offer(self, entity: dict[str, Any]) -> None:
        """A usage record for every sink's queue (shared between them: sinks only read it)."""
        record = {k: v for k, v in entity.items() if k not in _STORAGE_KEYS}
        for sink in self.sinks:
            sink.offer(record)

    def stats(self) -> dict[str, dict[str, int]]:
        return {sink.name: sink.stats() for sink in self.sinks}

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what the sinks hold within `timeout` (what is left is counted and logged),
        then close every plugin."""
        deadline = asyncio.get_running_loop().time() + timeout
        await asyncio.gather(*(sink.close(deadline) for sink in self.sinks))
        for name, plugin in self.loaded:
            closing = getattr(plugin, "close", None)
            if not callable(closing):
                continue
            try:
                async with asyncio.timeout(max(deadline - asyncio.get_running_loop().time(), 1)):
                    result = closing()
                    if inspect.isawaitable(result):
                        await result
            except Exception as exc:
                log.error("plugin %s: close failed: %s: %s", name, type(exc).__name__, exc)


def entries(items: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, module:attribute) of each plugin named in AIPROXY_PLUGINS, in order."""
    found: list[tuple[str, str]] = []
    settings_seen: dict[str, str] = {}
    for item in items:
        name, sep, target = (part.strip() for part in item.partition("="))
        if not sep:
            target = name
        target = SHIPPED.get(target, target)
        if not _NAME.fullmatch(name):
            raise PluginError(
                f"plugin {name!r}: names hold letters, digits and '_.:-' (at most 100)"
            )
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise PluginError(
                f"plugin '{name}': {target!r} is neither a shipped plugin "
                f"({', '.join(SHIPPED)}) nor 'module:attribute'"
            )
        setting = settings_module.plugin_setting_name(name)
        if setting in settings_seen:
            raise PluginError(
                f"plugin '{name}': its setting {setting} is also the setting of plugin "
                f"'{settings_seen[setting]}'; name one of them differently (alias=...)"
            )
        settings_seen[setting] = name
        found.append((name, target))
    return found


def build(name: str, target: str, raw_config: str) -> Any:
    """One plugin, made from its factory and its JSON config; PluginError says what is wrong."""
    setting = settings_module.plugin_setting_name(name)
    module_name, _, attribute = target.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(f"plugin '{name}': cannot import {module_name}: {exc}") from exc
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise PluginError(f"plugin '{name}': {module_name} has no {attribute}")
    try:
        config = json.loads(raw_config) if raw_config.strip() else {}
    except ValueError as exc:
        raise PluginError(f"plugin '{name}': {setting} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise PluginError(f"plugin '{name}': {setting} must be a JSON object")
    try:
        plugin = factory(config)
    except Exception as exc:
        raise PluginError(f"plugin '{name}': {setting}: {exc}") from exc
    hooks = [h for h in ("on_request", "on_usage") if callable(getattr(plugin, h, None))]
    if not hooks:
        raise PluginError(f"plugin '{name}': {target} has neither on_request nor on_usage")
    for number in ("attempts", "queue_size", "batch_size"):
        value = getattr(plugin, number, 1)
        if "on_usage" in hooks and (not isinstance(value, int) or value < 1):
            raise PluginError(f"plugin '{name}': {number} must be a whole number above 0")
    try:
        plugin.name = name
    except AttributeError:
        pass
    return plugin


def load(settings: Settings, environ: Mapping[str, str] | None = None) -> Plugins:
    """The plugins `settings` name, each built with its config; PluginError if one cannot be."""
    loaded = [
        (name, build(name, target, settings_module.plugin_config(name, environ)))
        for name, target in entries(settings.plugins)
    ]
    if loaded:
        log.info("plugins loaded: %s", ", ".join(name for name, _ in loaded))
    return Plugins(
        loaded, settings.plugins_request_budget_ms / 1000, settings.plugins_usage_budget_seconds
    )


def check(environ: Mapping[str, str] | None = None) -> None:
    """Build the configured plugins once, at start-up: one that cannot load stops the app
    there, named with the reason, instead of failing every call later."""
    load(settings_module.load(environ), environ)
