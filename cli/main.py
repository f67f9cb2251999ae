"""aiproxy: manage events, resources, catalogs, attendees and usage from the command line.

Exit codes: 0 done, 1 the API refused (4xx/5xx), 2 usage error (also: no credential, or no Entra
token to be had), 3 cannot reach the proxy, 141 the reader of the output went away (`| head`),
as for a Unix tool that SIGPIPE stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic_core import PydanticUndefined

from cli.api import Api, ApiError, Target, Unreachable, normalize_endpoint
from cli.bulk import InputError, issue_keys, read_users, write_keys
from cli.credentials import SOURCES, CredentialError, resolve
from cli.output import print_json, table
from shared.directory.models import Body, EventCreate, ResourceCreate

OK, API_ERROR, USAGE_ERROR, UNREACHABLE = 0, 1, 2, 3
# What a shell reports for a tool killed by SIGPIPE: `set -o pipefail` scripts see the output cut.
OUTPUT_CLOSED = 141
PROG = "aiproxy"
USAGE_NUMBERS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "units")
USAGE_COST = ("cached_tokens", "reasoning_tokens", "cost", "unpriced")  # with --cost
USAGE_KEYS = {
    "attendee": ("attendee_id", "user"),
    "deployment": ("deployment",),
    "day": ("day",),
    "hour": ("hour",),
}


class UsageError(Exception):
    """The command line itself is wrong (exit code 2)."""


# --- field flags shared by create and update --------------------------------------------------

# The flags are the bodies' fields (shared/directory/models.py): their types, choices, help and
# which ones a create needs. A flag is the field's name with dashes, except these.
_FLAGS = {"description_markdown": "--description", "endpoint": "--url"}
_MORE_HELP = {"description_markdown": "; @FILE reads a file", "api_key": "; '-' reads stdin"}


def id_list(text: str) -> list[str]:
    """A comma-separated list of ids; '' is an empty list (it clears the field)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _is_list(annotation: Any) -> bool:
    """A list field, or a list or null (an MCP server's allowed_tools)."""
    return get_origin(annotation) is list or any(
        get_origin(arg) is list for arg in get_args(annotation)
    )


def _kind(annotation: Any) -> Callable[[str], Any]:
    """How a flag's text becomes the field's JSON value."""
    if _is_list(annotation):
        return id_list
    return int if annotation is int else str


def _add_fields(parser: argparse.ArgumentParser, model: type[Body], *, create: bool) -> None:
    for name, info in model.model_fields.items():
        if name == "active":  # a switch pair, below
            continue
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
        text = (info.description or "") + _MORE_HELP.get(name, "")
        if info.default not in (None, "", 0, PydanticUndefined) and info.annotation is not bool:
            text += f" (default {info.default})"
        if _is_list(info.annotation):
            text += "; separated by commas ('' clears it)"
        if info.annotation is bool:  # --name turns it on, --no-name off; left out: unchanged
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=f"field_{name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
            continue
        parser.add_argument(
            _FLAGS.get(name, "--" + name.replace("_", "-")),
            dest=f"field_{name}",
            type=_kind(info.annotation),
            required=create and info.is_required(),
            choices=choices,
            metavar=None if choices else name.upper(),
            help=text,
        )
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument(
        "--active", dest="field_active", action="store_const", const=True, help="switch it on"
    )
    switch.add_argument(
        "--inactive",
        dest="field_active",
        action="store_const",
        const=False,
        help="switch it off (--active switches it on again)",
    )


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    body = {
        name[len("field_") :]: value
        for name, value in vars(args).items()
        if name.startswith("field_") and value is not None
    }
    description = body.get("description_markdown")
    if isinstance(description, str) and description.startswith("@"):
        try:
            body["description_markdown"] = Path(description[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read --description file: {exc}") from exc
    if body.get("api_key") == "-":
        body["api_key"] = sys.stdin.readline().strip()
    return body


# --- commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """A kind of record organisers own, as a command group: list, create, (show,) update and
    delete, over the API's collection of the same name; the flags are its body's fields."""

    group: str  # the command group and the API's collection
    noun: str  # what one is called; its id argument is <noun>_id
    model: type[Body]  # the create and update bodies: the fields' flags
    about: str  # the group's help
    helps: dict[str, str]  # each command's help, by its name (one that makes a record: create)
    columns: tuple[str, ...]  # the list's table
    order: str = ""  # the list is sorted by this column ("": as answered)
    hint: str = ""  # flags to suggest when an update gives none
    examples: dict[str, str] = field(default_factory=dict)  # a command's example
    force: str = ""  # a delete's --force: what it also deletes ("": no such flag)

    def id_of(self, args: argparse.Namespace) -> str:
        return getattr(args, f"{self.noun}_id")

    def list(self, api: Api, args: argparse.Namespace) -> None:
        found = api.json("GET", f"/{self.group}")
        if args.json:
            return print_json(found)
        table(sorted(found, key=lambda row: row[self.order]) if self.order else found, self.columns)

    def create(self, api: Api, args: argparse.Namespace) -> None:
        created = api.json("POST", f"/{self.group}", body=_fields(args))
        print_json(created) if args.json else print(created["id"])

    def show(self, api: Api, args: argparse.Namespace) -> None:
        print_json(api.json("GET", f"/{self.group}/{self.id_of(args)}"))

    def update(self, api: Api, args: argparse.Namespace) -> None:
        body = _fields(args)
        if not body:
            raise UsageError(f"nothing to change: give at least one field, e.g. {self.hint}")
        print_json(api.json("PATCH", f"/{self.group}/{self.id_of(args)}", body=body))

    def delete(self, api: Api, args: argparse.Namespace) -> None:
        params = {"force": "true"} if getattr(args, "force", False) else None
        api.send("DELETE", f"/{self.group}/{self.id_of(args)}", params=params)
        print(f"deleted {self.noun} {self.id_of(args)}", file=sys.stderr)


EVENTS = Owned(
    "events",
    "event",
    EventCreate,
    "create, list, show, change and delete events",
    {
        "list": "List the events you may see.",
        "create": "Create an event; prints its id.",
        "show": "Show one event as JSON.",
        "update": "Change the fields given; prints the event as JSON.",
        "delete": "Delete an event (refused while it has attendees).",
    },
    ("id", "name", "starts_at", "ends_at", "time_zone", "active"),
    order="starts_at",
    hint="--name or --inactive",
    examples={
        "create": "aiproxy events create --name Hackathon --starts-at 2026-05-04T09:00:00 \\\n"
        "    --ends-at 2026-05-05T18:00:00 --time-zone Europe/Berlin --max-token-cap 2048 \\\n"
        "    --daily-request-cap 500 --shared-code SPRING26",
        "update": "aiproxy events update EVENT_ID --daily-request-cap 1000 --inactive",
    },
    force="also delete its attendees and their keys",
)
RESOURCES = Owned(
    "resources",
    "resource",
    ResourceCreate,
    "the upstream deployments events can use",
    {
        "list": "List resources (never with their keys).",
        "add": "Add an upstream deployment; prints its id.",
        "update": "Change the fields given; prints it as JSON.",
        "delete": "Delete a resource (refused while in a catalog).",
    },
    ("id", "name", "deployment", "model_class", "endpoint", "auth", "priority", "weight", "active"),
    hint="--weight or --api-key",
    examples={
        "add": "aiproxy resources add --name east --deployment gpt-4o-mini \\\n"
        "    --model-class openai-chat --url https://NAME.openai.azure.com --api-key - < key.txt"
    },
)


def catalog_attach(api: Api, args: argparse.Namespace) -> None:
    attached = api.json("PUT", f"/events/{args.event}/resources/{args.resource}")
    resource = attached["resource"]
    print(
        f"attached {resource['id']} ({resource['deployment']}) to event {args.event}",
        file=sys.stderr,
    )


def catalog_detach(api: Api, args: argparse.Namespace) -> None:
    api.send("DELETE", f"/events/{args.event}/resources/{args.resource}")
    print(f"detached {args.resource} from event {args.event}", file=sys.stderr)


def catalog_list(api: Api, args: argparse.Namespace) -> None:
    found = api.json("GET", f"/events/{args.event}/resources")
    print_json(found) if args.json else table(found, RESOURCES.columns)


def alerts_list(api: Api, args: argparse.Namespace) -> None:
    found = api.json("GET", f"/events/{args.event}/alerts")
    columns = ["threshold_percent", "spent", "budget", "currency", "fired_at", "delivered"]
    print_json(found) if args.json else table(found, columns)


def alerts_secret(api: Api, args: argparse.Namespace) -> None:
    print(api.json("POST", f"/events/{args.event}/alerts/secret")["secret"])


def _attendee_id(api: Api, args: argparse.Namespace) -> str:
    if args.attendee:
        return args.attendee
    wanted = args.user.strip().lower()
    named = [
        attendee["id"]
        for attendee in api.json("GET", f"/events/{args.event}/attendees")
        if attendee["user"].strip().lower() == wanted
    ]
    if not named:
        raise ApiError(404, "not_found", f"No attendee '{args.user}' in event {args.event}.")
    if len(named) > 1:  # signed-in users are their ids: a renamed login's name can come back
        raise UsageError(
            f"{len(named)} attendees of event {args.event} are named '{args.user}' "
            f"(ids {', '.join(named)}): name one with --attendee ID."
        )
    return named[0]


def attendees_add(api: Api, args: argparse.Namespace) -> None:
    response = api.send("POST", f"/events/{args.event}/attendees", body={"user": args.user})
    added = response.json()
    if response.status_code == 200:
        print(f"{args.user} already had a key; it is unchanged", file=sys.stderr)
    print_json(added) if args.json else print(added["api_key"])


def attendees_list(api: Api, args: argparse.Namespace) -> None:
    found = api.json("GET", f"/events/{args.event}/attendees")
    if args.json:
        return print_json(found)
    columns = ["id", "user", "active", "requests", "total_tokens", "created_at"]
    table(sorted(found, key=lambda a: a["user"].lower()), columns)


def attendees_revoke(api: Api, args: argparse.Namespace) -> None:
    attendee_id = _attendee_id(api, args)
    revoked = api.json("DELETE", f"/events/{args.event}/attendees/{attendee_id}")
    print(f"revoked {revoked['user']} ({attendee_id})", file=sys.stderr)


def attendees_rotate(api: Api, args: argparse.Namespace) -> None:
    attendee_id = _attendee_id(api, args)
    rotated = api.json("POST", f"/events/{args.event}/attendees/{attendee_id}/rotate")
    print_json(rotated) if args.json else print(rotated["api_key"])


def attendees_bulk(api: Api, args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.concurrency > 64:
        raise UsageError("--concurrency must be from 1 to 64")
    try:
        text = Path(args.input).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {args.input}: {exc.strerror or exc}") from exc
    try:
        users = read_users(text, args.column)
    except InputError as exc:
        raise UsageError(f"{args.input}: {exc}") from exc
    issued = asyncio.run(
        issue_keys(
            api.target, args.event, users, concurrency=args.concurrency, progress=not args.quiet
        )
    )
    write_keys(issued, args.output)
    failed = [i for i in issued if i.error]
    created = sum(1 for i in issued if i.created)
    done = len(issued) - len(failed)
    where = "stdout" if args.output == "-" else args.output
    print(
        f"{done} keys ({created} new, {done - created} existing) written to {where}",
        file=sys.stderr,
    )
    for failure in failed:
        print(f"{PROG}: error: {failure.user}: {failure.error}", file=sys.stderr)
    return API_ERROR if failed else OK


def usage(api: Api, args: argparse.Namespace) -> None:
    params = {"group_by": args.group_by}
    if args.format == "csv":
        params["format"] = "csv"
        text = api.send("GET", f"/events/{args.event}/usage", params=params).text
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    report = api.json("GET", f"/events/{args.event}/usage", params=params)
    if args.format == "json":
        return print_json(report)
    keys = USAGE_KEYS[args.group_by]
    extra = ["active_attendees", "new_attendees"] if args.group_by == "hour" else []
    rows, footer = report["rows"], {**report["totals"], keys[0]: "total"}
    if "refused" in footer:  # by attendee and by day: refused calls, all reasons together
        extra = ["refused"]
        rows = [{**row, "refused": sum(row["refused"].values())} for row in rows]
        footer["refused"] = sum(footer["refused"].values())
    numbers = [*USAGE_NUMBERS, *USAGE_COST] if args.cost else USAGE_NUMBERS
    table(rows, [*keys, *numbers, *extra], footer=footer)


# --- the parser ---------------------------------------------------------------------------


# The connection options: flag, default (the environment's, else this), help, more of argparse.
_CONNECTION: tuple[tuple[str, Any, str, dict[str, Any]], ...] = (
    ("--endpoint", None, "the proxy's base URL, e.g. http://127.0.0.1:7071/api (env "
     "AIPROXY_ENDPOINT)", {}),
    ("--operator-key", None, "the operator's key: every event and resource (env "
     "AIPROXY_OPERATOR_KEY)", {}),
    ("--token", None, "an organiser's Entra access token for the app (env AIPROXY_TOKEN)", {}),
    ("--entra-scope", None, "or get that token for api://<client id>/.default from az login, "
     "azd, a managed or workload identity (env AIPROXY_ENTRA_SCOPE)", {"metavar": "SCOPE"}),
    # The function key opened manage/* once; kept to say what replaced it.
    ("--key", None, argparse.SUPPRESS, {}),
    ("--timeout", 30.0, "seconds to wait for each answer (default 30)", {"type": float}),
)  # fmt: skip


def _common() -> argparse.ArgumentParser:
    """Connection options, accepted before or after the command (default: the environment)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    for flag, _, text, more in _CONNECTION:
        group.add_argument(flag, default=argparse.SUPPRESS, help=text, **more)
    return common


def _json_flag(parser: argparse.ArgumentParser, what: str = "the API's JSON") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} instead")


def _attendee_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--event", required=True, help="the event's id")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--attendee", help="the attendee's id")
    which.add_argument("--user", help="or the attendee's user name / email")


Command = Callable[[Api, argparse.Namespace], int | None]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        parents=[common],
        description="Manage AI Proxy events, resources, catalogs, attendees and usage.",
        epilog=(
            "Set AIPROXY_ENDPOINT (e.g. http://127.0.0.1:7071/api) or pass --endpoint, and one\n"
            "credential: the operator sets AIPROXY_OPERATOR_KEY (--operator-key); organisers\n"
            "set AIPROXY_ENTRA_SCOPE=api://<client id>/.default (--entra-scope) to use az login,\n"
            "or paste a token in AIPROXY_TOKEN (--token).\n"
            "Exit codes: 0 done, 1 the API refused, 2 usage error, 3 cannot reach the proxy,\n"
            "141 the output's reader went away (as `| head` does).\n\n"
            "Set up an event from nothing:\n"
            "  RES=$(aiproxy resources add --name east --deployment gpt-4o-mini \\\n"
            "        --model-class openai-chat --url https://NAME.openai.azure.com --api-key -)\n"
            "  EVENT=$(aiproxy events create --name Hackathon --starts-at 2026-05-04T09:00:00 \\\n"
            "        --ends-at 2026-05-05T18:00:00 --time-zone Europe/Berlin \\\n"
            "        --max-token-cap 2048 --daily-request-cap 500)\n"
            "  aiproxy catalog attach --event $EVENT --resource $RES\n"
            "  aiproxy attendees bulk --event $EVENT --input users.csv --output keys.csv\n"
            "  aiproxy usage --event $EVENT --group-by attendee"
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} 0.1.0")
    parser.set_defaults(**{flag[2:].replace("-", "_"): value for flag, value, _, _ in _CONNECTION})
    groups = parser.add_subparsers(dest="group", metavar="COMMAND")

    def group(name: str, text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        sub = groups.add_parser(
            name, help=text, description=text, formatter_class=_Formatter, parents=[common]
        )
        sub.set_defaults(group_parser=sub)
        return sub.add_subparsers(dest="command", metavar="ACTION")

    def command(
        actions: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        run: Command,
        text: str,
        epilog: str | None = None,
    ) -> argparse.ArgumentParser:
        sub = actions.add_parser(
            name,
            help=text,
            description=text,
            epilog=epilog,
            formatter_class=_Formatter,
            parents=[common],
        )
        sub.set_defaults(run=run)
        return sub

    for owned in (EVENTS, RESOURCES):
        actions = group(owned.group, owned.about)
        for name, text in owned.helps.items():
            action = {"add": "create"}.get(name, name)  # resources are added
            example = owned.examples.get(name)
            epilog = f"example:\n  {example}" if example else None
            sub = command(actions, name, getattr(owned, action), text, epilog)
            if action in ("show", "update", "delete"):
                sub.add_argument(f"{owned.noun}_id", help=f"the {owned.noun}'s id")
            if action in ("create", "update"):
                _add_fields(sub, owned.model, create=action == "create")
            if action == "create":
                _json_flag(sub, f"the created {owned.noun} as JSON")
            elif action == "list":
                _json_flag(sub)
            elif action == "delete" and owned.force:
                sub.add_argument("--force", action="store_true", help=owned.force)

    catalog = group("catalog", "which resources an event's attendees can use")
    for name, run, text in (
        ("attach", catalog_attach, "Add a resource to an event's catalog."),
        ("detach", catalog_detach, "Take a resource out of an event's catalog."),
    ):
        sub = command(catalog, name, run, text)
        sub.add_argument("--event", required=True, help="the event's id")
        sub.add_argument("--resource", required=True, help="the resource's id")
    sub = command(catalog, "list", catalog_list, "List an event's catalog.")
    sub.add_argument("--event", required=True, help="the event's id")
    _json_flag(sub)

    alerts = group("alerts", "the budget alerts of an event and the secret that signs them")
    sub = command(alerts, "list", alerts_list, "List the budget thresholds the event reached.")
    sub.add_argument("--event", required=True, help="the event's id")
    _json_flag(sub)
    sub = command(
        alerts,
        "secret",
        alerts_secret,
        "Make a new secret signing the event's alert webhooks and print it (shown once; the "
        "previous one stops signing).",
    )
    sub.add_argument("--event", required=True, help="the event's id")

    attendees = group("attendees", "keys for the people at an event")
    sub = command(
        attendees,
        "add",
        attendees_add,
        "Issue a key to one user and print it (the same user again gets the same key).",
    )
    sub.add_argument("--event", required=True, help="the event's id")
    sub.add_argument("--user", required=True, help="an email, a login or any name")
    _json_flag(sub, "the attendee as JSON")
    sub = command(attendees, "list", attendees_list, "List attendees with their totals.")
    sub.add_argument("--event", required=True, help="the event's id")
    _json_flag(sub)
    sub = command(attendees, "revoke", attendees_revoke, "Revoke an attendee's key.")
    _attendee_choice(sub)
    sub = command(attendees, "rotate", attendees_rotate, "Give an attendee a new key and print it.")
    _attendee_choice(sub)
    _json_flag(sub, "the attendee as JSON")
    sub = command(
        attendees,
        "bulk",
        attendees_bulk,
        "Issue keys for every user of a CSV file; write user,attendee_id,api_key.",
        "The users are the column given by --column, else 'user', else 'email', else the\n"
        "first column. A first row without those names is a header unless it holds an\n"
        "email address. Users who already have a key get the same key again, so the\n"
        "command can be re-run safely.\n\n"
        "example:\n  aiproxy attendees bulk --event EVENT_ID --input users.csv --output keys.csv",
    )
    sub.add_argument("--event", required=True, help="the event's id")
    sub.add_argument("--input", required=True, metavar="CSV", help="the users")
    sub.add_argument(
        "--output", required=True, metavar="CSV", help="where the keys go ('-': stdout)"
    )
    sub.add_argument("--column", help="the column holding the users")
    sub.add_argument("--concurrency", type=int, default=8, help="requests at a time (default 8)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = groups.add_parser(
        "usage",
        help="usage totals of an event",
        description="Usage totals of an event: requests and tokens by attendee, deployment, day "
        "or hour; calls refused by attendee and by day (by reason in csv and json); attendees "
        "active and new by hour.",
        epilog="example:\n  aiproxy usage --event EVENT_ID --group-by day --format csv > usage.csv",
        formatter_class=_Formatter,
        parents=[common],
    )
    sub.set_defaults(run=usage)
    sub.add_argument("--event", required=True, help="the event's id")
    sub.add_argument(
        "--cost",
        action="store_true",
        help="also cached and reasoning tokens, the cost (in the prices' currency) and the "
        "calls no price covers (unpriced)",
    )
    sub.add_argument(
        "--group-by",
        choices=tuple(USAGE_KEYS),
        default="attendee",
        help="one row per attendee (default), deployment, day (event time zone) or hour (UTC)",
    )
    sub.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="a table with totals (default), CSV, or the API's JSON",
    )
    return parser


def _target(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    endpoint = args.endpoint or environ.get("AIPROXY_ENDPOINT", "")
    if not endpoint:
        raise UsageError(
            "no endpoint: pass --endpoint or set AIPROXY_ENDPOINT (e.g. http://127.0.0.1:7071/api)"
        )
    if not endpoint.startswith(("http://", "https://")):
        raise UsageError(f"the endpoint must be an http(s) URL, not {endpoint!r}")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    flags = {flag: getattr(args, flag[2:].replace("-", "_")) for flag, _ in SOURCES}
    try:
        credential = resolve(flags, environ, legacy_key=bool(args.key))
    except CredentialError as exc:
        raise UsageError(str(exc)) from exc
    return Target(normalize_endpoint(endpoint), credential, args.timeout)


def run(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; the exit code. `environ` is where the endpoint and the credential are
    read (os.environ by default); an Entra token fetched for --entra-scope still sees os.environ."""
    try:
        try:
            return _run(argv, os.environ if environ is None else environ)
        finally:
            sys.stdout.flush()  # here, where a closed pipe is still ours to catch (--help too)
    except BrokenPipeError:
        # Whoever read the output is gone: nothing more to say, and nowhere to say it.
        # Python's last flush at exit must not find the broken pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OUTPUT_CLOSED


def _run(argv: Sequence[str] | None, environ: Mapping[str, str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
        return USAGE_ERROR
    try:
        api = Api(_target(args, environ))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return args.run(api, args) or OK
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ApiError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"{PROG}: check: {exc.hint}", file=sys.stderr)
        return API_ERROR
    except Unreachable as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        api.close()


def main() -> None:
    sys.exit(run())
