"""What organisers send and get back for events, resources and attendees, as typed models.

Each management body and answer is described once, here. The management API validates bodies
with these models (`shared.directory.validation.parse` turns their errors into the contract's
400), the OpenAPI document takes its schemas from them and the `aiproxy` command line its flags,
choices and help. A check across fields sits on the later field and reads the earlier ones from
`info.data`, which holds only the valid ones, so it is reported beside the other fields'
problems. A patch is validated as the whole object with the patch laid over it.

Only pydantic (and the settings module, for the endpoints' policy) is needed here: the command
line imports this module.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from shared.directory.endpoints import (
    ENDPOINT_FIX,
    MCP_ENDPOINT_FIX,
    EndpointPolicy,
    endpoint_problem,
    mcp_endpoint_problem,
    webhook_problem,
)
from shared.platform import settings

# Caps and limits are stored as 32-bit integers; no event needs more.
CAP_LIMIT = 2**31 - 1

ModelClass = Literal[
    "openai-chat",
    "openai-completions",
    "openai-embeddings",
    "openai-images",
    "openai-audio",
    "openai-realtime",
    "azure-ai-search",
    "mcp",
]
MODEL_CLASSES: tuple[str, ...] = get_args(ModelClass)
Auth = Literal["key", "managed_identity", "bearer", "none"]
# The ways of calling only an MCP server takes: its token as Authorization: Bearer, or nothing.
MCP_ONLY_AUTH = ("bearer", "none")
# An MCP tool name (the specification: 1 to 128 of these characters).
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
SelfRegistration = Literal["auto", "code", "sign_in", "both", "none"]
SELF_REGISTRATION: tuple[str, ...] = get_args(SelfRegistration)
AUTH_KINDS: tuple[str, ...] = get_args(Auth)
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
DEPLOYMENT_NAME = re.compile(f"^{_NAME}$")
_HEX = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
GUID = re.compile(f"^{_HEX}$")  # an Entra tenant or object id, lower-cased


def problem(text: str, fix: str) -> PydanticCustomError:
    """A field's problem in words, and what to send instead: one entry of `error.details`."""
    return PydanticCustomError("field", "{problem}", {"problem": text, "fix": fix})


# --- field types --------------------------------------------------------------------------
# Constraints come before validators in each Annotated, so that pydantic checks them on the
# stripped string and writes them into the JSON schema.


def or_null(schema: dict[str, Any]) -> None:
    """A field's JSON schema that also takes null (null means empty, or none)."""
    schema["type"] = [schema["type"], "null"]


def _null_is_empty(value: Any) -> Any:
    return "" if value is None else value


def _null_is_zero(value: Any) -> Any:
    return 0 if value is None else value


Filled = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
"""A string that must hold more than spaces."""
Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True),
    BeforeValidator(_null_is_empty),
    Field(json_schema_extra=or_null),
]
"""An optional string; null is the same as empty."""
Cap = Annotated[int, Field(ge=1, le=CAP_LIMIT)]
Limit = Annotated[
    int,
    Field(ge=0, le=CAP_LIMIT, json_schema_extra=or_null),
    BeforeValidator(_null_is_zero),
]
"""An optional limit: 0 or null for none."""


def _zone_name(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # "Europe" is a directory: OSError
        raise problem(
            f"must be an IANA time zone such as 'Europe/Berlin', not {name!r}",
            "Send an IANA time zone name such as 'Europe/Berlin' or 'UTC'.",
        ) from None
    return name


_WALL_CLOCK_FIX = "Send a wall-clock time in the event's time zone, such as '2026-05-04T09:00:00'."


def _date_time(value: Any) -> Any:
    if isinstance(value, datetime):  # a patch lays the body over the stored event
        return value
    if not isinstance(value, str):
        raise problem(
            "must be an ISO 8601 date-time string such as '2026-05-04T09:00:00'", _WALL_CLOCK_FIX
        )
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise problem(f"is not an ISO 8601 date-time: {value!r}", _WALL_CLOCK_FIX) from None


WallClock = Annotated[datetime, BeforeValidator(_date_time), WithJsonSchema({"type": "string"})]
"""An ISO 8601 date-time; with an offset it is converted into the event's zone."""


def _page_url(value: str) -> str:
    if value and not value.startswith(("https://", "http://", "/")):
        raise problem("must be an http(s) URL", "Send an https:// address, or leave it empty.")
    return value


_NAME_FIX = "Use letters, digits, '.', '_' and '-', starting with a letter or digit."


def _deployment_name(value: str) -> str:
    if value and DEPLOYMENT_NAME.match(value) is None:
        raise problem("may hold letters, digits, '.', '_' and '-' (at most 64)", _NAME_FIX)
    return value


DeploymentName = Annotated[
    Filled, AfterValidator(_deployment_name), Field(json_schema_extra={"pattern": f"^{_NAME}$"})
]


def _upstream_name_schema(spec: dict[str, Any]) -> None:
    spec["pattern"] = f"^({_NAME})?$"
    or_null(spec)  # as Text's: a field's last json_schema_extra replaces the earlier ones


UpstreamName = Annotated[
    Text, AfterValidator(_deployment_name), Field(json_schema_extra=_upstream_name_schema)
]


def _endpoint(value: str, info: ValidationInfo) -> str:
    value = value.rstrip("/")
    policy = EndpointPolicy.of(settings.get())
    if info.data.get("model_class") == "mcp":
        found = mcp_endpoint_problem(value, policy)
        if found is not None:
            raise problem(found, MCP_ENDPOINT_FIX)
        return value
    found = endpoint_problem(value, policy)
    if found is not None:
        raise problem(found, ENDPOINT_FIX)
    return value


def _tool_names(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    for name in value:
        if TOOL_NAME.match(name) is None:
            raise problem(
                f"holds {name[:130]!r}, which is not a tool name",
                "Send the MCP server's tool names as it lists them: 1 to 128 letters, digits, "
                "'_', '-' and '.'.",
            )
    return list(dict.fromkeys(value))


# A resource's own prices: per 1M tokens (input, cached_input, output, audio_input,
# audio_output: output audio where it is priced apart from output text), per
# image, per audio minute, per 1M characters (speech). The event's currency.
PRICE_KINDS = ("input", "cached_input", "output", "audio_input", "audio_output", "image",
               "audio_minute", "characters")  # fmt: skip
_PRICES_FIX = (
    "Send figures as 'input=0.15,cached_input=0.075,output=0.60' (per 1M tokens; image per "
    f"image, audio_minute per minute, characters per 1M), named from: {', '.join(PRICE_KINDS)}."
)


def parse_prices(text: str) -> dict[str, Decimal]:
    """A resource's prices: 'input=0.15,output=0.6' -> their figures (ValueError if bad)."""
    figures: dict[str, Decimal] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in PRICE_KINDS or name in figures:
            raise ValueError(f"'{part.strip()[:40]}' is not one figure of {', '.join(PRICE_KINDS)}")
        try:
            figure = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"'{value.strip()[:40]}' is not a number") from None
        if not figure.is_finite() or figure < 0 or figure > 1_000_000 or figure != round(figure, 9):
            raise ValueError(f"{name} must be from 0 to 1000000 with at most 9 decimals")
        figures[name] = figure
    return figures


def _prices(value: str) -> str:
    try:
        figures = parse_prices(value)
    except ValueError as exc:
        raise problem(str(exc), _PRICES_FIX) from None
    return ",".join(f"{name}={figures[name]}" for name in PRICE_KINDS if name in figures)


def _amount(value: str) -> str:
    """A budget: an amount of the event's currency, at most 9 decimals; empty or 0: none."""
    try:
        amount = Decimal(value or "0")
    except InvalidOperation:
        amount = Decimal(-1)
    if not amount.is_finite() or not 0 <= amount <= 1_000_000_000 or amount != round(amount, 9):
        raise problem(
            "must be an amount from 0 to 1000000000 with at most 9 decimals",
            "Send an amount of the event's currency such as '250' or '12.50'; '' or '0' for none.",
        )
    return "" if amount == 0 else f"{amount.normalize():f}"


Money = Annotated[Text, AfterValidator(_amount)]
"""A budget in the event's currency, as a decimal string; empty: none."""


def _webhook(value: str) -> str:
    found = webhook_problem(value, EndpointPolicy.of(settings.get())) if value else None
    if found is not None:
        raise problem(found, "Send an https URL on a public host, or '' for no webhook.")
    return value


def _thresholds(value: str) -> str:
    """Percentages of the event's budget, each fired once: '50,80,100'."""
    try:
        found = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        found = [0]
    if any(not 1 <= n <= 1000 for n in found) or len(found) > 10:
        raise problem(
            "must be up to 10 whole percentages from 1 to 1000, separated by commas",
            "Send percentages of the event's budget such as '50,80,100'; '' for no alerts.",
        )
    return ",".join(map(str, found))


def _entra_ids(limit: int, what: str, each: str) -> Any:
    """A list of Entra ids (tenants, users, apps, groups), lower-cased, each once; null: none."""

    def check(value: Any) -> Any:
        if value is None:
            return []
        fix = f'Send a JSON list of {what}, such as ["00000000-0000-0000-0000-000000000000"].'
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise problem("must be a list of ids (strings)", fix)
        found = list(dict.fromkeys(v.strip().lower() for v in value))
        bad = next((v for v in found if GUID.match(v) is None), None)
        if bad is not None:
            raise problem(f"holds {bad[:60]!r}, which is not an Entra id (a GUID)", fix)
        if len(found) > limit:
            raise problem(f"must hold at most {limit} ids", f"Send at most {limit}.")
        return found

    item = {"type": "string", "pattern": f"^{_HEX.replace('a-f', 'a-fA-F')}$", "description": each}

    def schema(spec: dict[str, Any]) -> None:
        spec.update(items=item, maxItems=limit)
        or_null(spec)

    return Annotated[list[str], Field(json_schema_extra=schema), BeforeValidator(check)]


EntraTenants = _entra_ids(20, "tenant ids", "an Entra tenant id")
EntraObjects = _entra_ids(
    500, "object ids of users, apps or groups", "an object id of a user, an app or a group"
)


# A shared code is all a stranger needs to get a key: long enough that it cannot be guessed
# at the rate wrong codes are allowed (shared/access/codes.py). "generate" asks for one.
MIN_SHARED_CODE = 8
GENERATE = "generate"
_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: read aloud, typed by hand


def new_shared_code() -> str:
    """A random code such as 'K7QM-XR4T-9BWE': 12 of 32 symbols, 60 bits."""
    groups = ("".join(secrets.choice(_CODE_ALPHABET) for _ in range(4)) for _ in range(3))
    return "-".join(groups)


def _shared_code(value: str, info: ValidationInfo) -> str:
    if value == GENERATE:
        return new_shared_code()
    # A code stored before the minimum existed keeps working until the organiser changes it.
    if value and len(value) < MIN_SHARED_CODE and value != (info.context or {}).get("stored_code"):
        raise problem(
            f"must be at least {MIN_SHARED_CODE} characters, so that it cannot be guessed",
            f"Send a longer code, or '{GENERATE}' to have a random one made for you.",
        )
    return value


def _user_name(value: str) -> str:
    if ":" in value:
        raise problem(
            "must not hold ':': names like 'aad:…' or 'github:…' are those of signed-in "
            "attendees, which the proxy names itself",
            "Send an email or a login without ':'; signed-in attendees get their key by "
            "registering themselves.",
        )
    return value


# --- bodies -------------------------------------------------------------------------------


class Body(BaseModel):
    """A management body: exact JSON types (no "5" for 5), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    noun: ClassVar[str] = "a body"  # "is not <noun> field" when a field is unknown


_WALL = "ISO 8601 wall-clock time in time_zone, e.g. 2026-05-04T09:00:00"


class EventCreate(Body):
    """A new event. A patch sends any of these fields; the others keep their values, and a new
    time_zone alone keeps the wall-clock times."""

    noun: ClassVar[str] = "an event"

    name: Filled = Field(max_length=200, description="the event's name, shown to attendees")
    time_zone: Annotated[Filled, AfterValidator(_zone_name)] = Field(
        max_length=64,
        description="IANA time zone of the event, e.g. Europe/Berlin; DST is honoured",
    )
    starts_at: WallClock = Field(description=f"start: {_WALL}")
    ends_at: WallClock = Field(description=f"end, after starts_at: {_WALL}")
    max_token_cap: Cap = Field(description="largest max_tokens one request may ask for")
    daily_request_cap: Cap = Field(description="requests per attendee per day (event time zone)")
    daily_token_cap: Limit = Field(0, description="tokens per attendee per day; 0 for none")
    event_daily_request_cap: Limit = Field(
        0,
        description="requests of all attendees together per day (event time zone), so new "
        "attendees cannot bring fresh quota without end; 0 or null for none",
    )
    event_daily_token_cap: Limit = Field(
        0, description="tokens of all attendees together per day; 0 or null for none"
    )
    requests_per_minute: Limit = Field(
        0, description="requests per attendee in any minute; 0 or null for no limit"
    )
    tokens_per_minute: Limit = Field(
        0,
        description="tokens per attendee in any minute (a call counts its worst case until it "
        "answers); 0 or null for no limit",
    )
    currency: Annotated[str, StringConstraints(pattern="^[A-Z]{3}$")] = Field(
        "USD",
        description="ISO 4217 code the budgets and prices are in; the shipped prices are USD "
        "(other currencies need each resource's own prices)",
    )
    budget: Money = Field(
        "", max_length=30, description="spend of all attendees together, ever; empty: none"
    )
    attendee_budget: Money = Field(
        "", max_length=30, description="spend per attendee over the whole event; empty: none"
    )
    attendee_daily_budget: Money = Field(
        "",
        max_length=30,
        description="spend per attendee per day (event time zone); empty: none",
    )
    budget_alerts: Annotated[Text, AfterValidator(_thresholds)] = Field(
        "50,80,100",
        max_length=60,
        description="percentages of `budget` at which an alert fires, once each: a webhook "
        "POST and a console banner; empty: none",
    )
    alert_webhook_url: Annotated[Text, AfterValidator(_webhook)] = Field(
        "",
        max_length=2_000,
        description="https URL the alerts are POSTed to, signed with the event's alert secret "
        "(x-aiproxy-signature: sha256=HMAC of the body); empty: console only",
    )
    realtime_max_session_seconds: int = Field(
        600,
        ge=10,
        le=3600,
        description="longest realtime voice session (WebRTC call) in seconds; the proxy ends "
        "a call when it passes this",
    )
    realtime_client_secrets: bool = Field(
        False,
        description="whether attendees may get ephemeral keys (realtime/client_secrets) whose "
        "sessions go straight to the deployment: only the key is counted, not the session's "
        "tokens, and no cap, budget or session limit of the event ends such a session",
    )
    description_markdown: Text = Field("", max_length=20_000, description="registration page text")
    organizer_name: Text = Field("", max_length=200, description="shown on the registration page")
    organizer_email: Text = Field(
        "", max_length=320, description="for the organiser's records, never public"
    )
    image_url: Annotated[Text, AfterValidator(_page_url)] = Field(
        "", max_length=2_000, description="http(s) URL of the registration page's image"
    )
    shared_code: Annotated[Text, AfterValidator(_shared_code)] = Field(
        "",
        max_length=100,
        description=f"code attendees register with themselves, at least {MIN_SHARED_CODE} "
        f"characters; '{GENERATE}' makes a random one (the answer shows it); empty: no "
        "registration by code",
    )
    self_registration: SelfRegistration = Field(
        "auto",
        description="how attendees may get a key themselves: 'code' (email and shared_code), "
        "'sign_in' (signed in through the app's EasyAuth), 'both', or 'none'; 'auto': by code "
        "when shared_code is set, else none",
    )
    # Entra ID callers (shared/access/entra.py).
    entra_tenants: EntraTenants = Field(
        default_factory=list,
        description="tenants whose Entra ID access tokens (audience "
        "https://cognitiveservices.azure.com) this event takes instead of a key; empty or null: "
        "none",
    )
    entra_allowed: EntraObjects = Field(
        default_factory=list,
        description="when not empty, only these users, apps (service principals) or groups of "
        "the entra_tenants may call; needs entra_tenants",
    )
    active: bool = Field(True, description="false switches the event off at once")

    @field_validator("self_registration")
    @classmethod
    def _code_to_register_with(cls, value: str, info: ValidationInfo) -> str:
        if value in ("code", "both") and info.data.get("shared_code") == "":
            raise problem(
                f"is '{value}', but shared_code is empty",
                f"Set shared_code (or '{GENERATE}'), or choose 'sign_in' or 'none'.",
            )
        return value

    @field_validator("starts_at", "ends_at")
    @classmethod
    def _in_zone(cls, value: datetime, info: ValidationInfo) -> datetime:
        zone = info.data.get("time_zone")  # absent when time_zone is bad: reported there
        if zone is None:
            return value
        if value.tzinfo is not None:
            value = value.astimezone(ZoneInfo(zone)).replace(tzinfo=None)
        value = value.replace(microsecond=0)
        starts = info.data.get("starts_at")
        if info.field_name == "ends_at" and starts is not None and value <= starts:
            raise problem("must be after starts_at", "Send an end later than the start.")
        return value

    @field_validator("entra_allowed")
    @classmethod
    def _allowed_of_some_tenant(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and info.data.get("entra_tenants") == []:  # absent when entra_tenants is bad
            raise problem(
                "names callers of no tenant: entra_tenants is empty",
                "Add their tenant id to entra_tenants, or send an empty entra_allowed.",
            )
        return value


class ResourceFields(Body):
    """The fields of an upstream deployment, as sent and as answered."""

    noun: ClassVar[str] = "a resource"

    name: Filled = Field(
        max_length=200, description="your label for it, e.g. 'gpt-4o-mini in Sweden Central'"
    )
    deployment: DeploymentName = Field(
        max_length=64,
        description="the deployment name attendees use; resources sharing it in an event form "
        "a pool",
    )
    model_class: ModelClass = Field(description="what it serves")
    endpoint: Annotated[Filled, AfterValidator(_endpoint)] = Field(
        max_length=500, description="its endpoint, e.g. https://NAME.openai.azure.com"
    )
    upstream_deployment: UpstreamName = Field(
        "", max_length=64, description="its deployment name upstream; empty: the same"
    )
    auth: Auth = Field(
        "key",
        description="how the app calls it: with its key (api-key header), the app's own "
        "identity, or for an MCP server also its token as Authorization: Bearer ('bearer', the "
        "token in api_key) or nothing ('none')",
    )
    priority: Annotated[int, Field(ge=0, le=1000)] = Field(
        1, description="lower is used first; higher only while lower ones cool down"
    )
    weight: Annotated[int, Field(ge=1, le=1000)] = Field(
        1, description="share of requests within its priority"
    )
    region: Text = Field("", max_length=64, description="for your records")
    active: bool = Field(True, description="false takes it out of every pool at once")
    quota_requests_per_minute: Limit = Field(
        0,
        description="its requests-per-minute quota in Azure: near it, each active attendee gets "
        "a fair share; 0 or null: not known",
    )
    quota_tokens_per_minute: Limit = Field(
        0, description="its tokens-per-minute quota in Azure; 0 or null: not known"
    )
    allowed_tools: Annotated[
        list[Annotated[str, StringConstraints(max_length=128)]] | None,
        Field(max_length=500),
        AfterValidator(_tool_names),
    ] = Field(
        None,
        description="MCP servers only: the tools attendees may list and call; null: all of them",
    )

    @field_validator("auth")
    @classmethod
    def _auth_of_class(cls, value: str, info: ValidationInfo) -> str:
        model_class = info.data.get("model_class")
        if value in MCP_ONLY_AUTH and model_class is not None and model_class != "mcp":
            raise problem(
                f"'{value}' is for MCP servers only",
                "Use auth 'key' with the deployment's api_key, or 'managed_identity'.",
            )
        return value

    @field_validator("allowed_tools")
    @classmethod
    def _tools_of_mcp(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        model_class = info.data.get("model_class")
        if value is not None and model_class is not None and model_class != "mcp":
            raise problem(
                "is for MCP servers only", "Leave allowed_tools out for a model deployment."
            )
        return value

    prices: Annotated[Text, AfterValidator(_prices)] = Field(
        "",
        max_length=300,
        description="its own prices, over the shipped table's for the model that answers: "
        "'input=0.15,cached_input=0.075,output=0.60' per 1M tokens (also audio_input), "
        "image per image, audio_minute per minute, characters per 1M; empty: the table's",
    )


class ResourceCreate(ResourceFields):
    """A new upstream deployment; api_key is required when auth is 'key'. A patch sends any of
    these fields; the others keep their values."""

    api_key: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]
        | None
    ) = Field(
        None,
        validate_default=True,
        description="its key, write-only: stored sealed, never returned",
    )

    @field_validator("api_key")
    @classmethod
    def _key_for_key_auth(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A patch passes has_api_key: the key stored before still counts.
        stored = (info.context or {}).get("has_api_key", False)
        auth = info.data.get("auth")
        if value is None and auth in ("key", "bearer") and not stored:
            raise problem(
                f"is required when auth is '{auth}'",
                "Send the resource's key (an MCP server's token for 'bearer') as 'api_key', "
                "or use auth 'managed_identity'.",
            )
        return value


class AttendeeCreate(Body):
    """A user to issue a key to; the same user again gets the same attendee and key.

    Names with ':' are refused: 'aad:…', 'github:…' are signed-in attendees' and 'code:…'
    those of keys made of the event's code; an organiser's attendee must never be one of them.
    """

    noun: ClassVar[str] = "an attendee"

    user: Annotated[Filled, AfterValidator(_user_name)] = Field(
        max_length=200,
        description="an email, a login or any name without ':'; case-insensitive",
    )


# --- patches ------------------------------------------------------------------------------


def _as_patch(schema: dict[str, Any]) -> None:
    """A patch body's schema: the create body's fields, none required and none defaulted."""
    schema.pop("required", None)
    for spec in schema["properties"].values():
        spec.pop("default", None)


class EventPatch(EventCreate):
    """Any of an event's fields; the others keep their values (validated as EventCreate, with
    the patch laid over the stored event)."""

    model_config = ConfigDict(json_schema_extra=_as_patch)


class ResourcePatch(ResourceCreate):
    """Any of a resource's fields; the others keep their values."""

    model_config = ConfigDict(json_schema_extra=_as_patch)


# --- answers ------------------------------------------------------------------------------

# Answers are described, never validated; they always carry every field.
ANSWER = ConfigDict(extra="ignore", json_schema_serialization_defaults_required=True)
UTC_TIME = {"format": "date-time"}


class Created(BaseModel):
    """Who created a thing organisers own (an event, a resource), and when."""

    owner: str = Field(description="the signed-in creator ('<idp>:<id>'); empty for operators")
    created_at: str = Field(description="creation time, UTC", json_schema_extra=UTC_TIME)


class EventView(Created, EventCreate):
    """An event as its organiser sees it."""

    model_config = ANSWER

    id: str = Field(description="the event's id")
    starts_at_utc: str = Field(description="the start in UTC", json_schema_extra=UTC_TIME)
    ends_at_utc: str = Field(description="the end in UTC", json_schema_extra=UTC_TIME)


class RegistrationState(BaseModel):
    """Whether and how attendees can register themselves now."""

    open: bool = Field(description="the event takes registrations now (active, not ended)")
    shared_code: bool = Field(description="attendees register with email and shared code")
    sign_in: bool = Field(
        description="signed-in users register (the event allows it and the app trusts sign-in)"
    )


PUBLIC_FIELDS = (  # what anyone may see of an event (Event.public())
    "id",
    "name",
    "starts_at",
    "ends_at",
    "time_zone",
    "starts_at_utc",
    "ends_at_utc",
    "organizer_name",
    "description_markdown",
    "image_url",
    "self_registration",
    "active",
)


def event_fields(*names: str) -> dict[str, Any]:
    """Fields of EventView, for answers that show part of an event (create_model's form)."""
    fields = EventView.model_fields
    return {name: (fields[name].annotation, fields[name]) for name in names}


PublicEventFields = create_model(
    "PublicEventFields",
    __config__=ANSWER,
    __doc__="What anyone may see of an event",
    **event_fields(*PUBLIC_FIELDS),
)


class PublicEvent(PublicEventFields):
    """What anyone may see of an event: the registration page's view."""

    registration: RegistrationState | None = Field(None, description="on the public page only")


class ResourceView(Created, ResourceFields):
    """An upstream deployment, never with its key."""

    model_config = ANSWER

    id: str = Field(description="the resource's id")
    has_api_key: bool = Field(description="whether a key is stored (it is never returned)")


class CatalogEntry(BaseModel):
    """A resource added to an event's catalog."""

    model_config = ANSWER

    event_id: str = Field(description="the event")
    resource: ResourceView = Field(description="the resource")


class AttendeeView(BaseModel):
    """One person's access to one event."""

    id: str = Field(description="the attendee's id, stable per event and user")
    event_id: str = Field(description="the event")
    user: str = Field(description="as given when added or registered")
    active: bool = Field(description="false once revoked")
    created_at: str = Field(description="creation time, UTC", json_schema_extra=UTC_TIME)
    revoked_at: str = Field(description="revocation time, UTC; empty while active")
    self_registered: bool = Field(
        description="registered itself with the event's code, so its key was shown to whoever "
        "registered; the organiser adding the same user, or rotating the key, gives it a new "
        "key only the organiser sees, and makes this false"
    )


class AttendeeWithKeyView(AttendeeView):
    """An attendee with its key."""

    api_key: str = Field(description="the attendee's key: 'aip-' and 32 letters and digits")


class UsageNumbers(BaseModel):
    """What calls used: the numbers every usage total has."""

    requests: int = Field(ge=0, description="requests answered")
    prompt_tokens: int = Field(ge=0, description="prompt tokens")
    completion_tokens: int = Field(ge=0, description="completion tokens")
    total_tokens: int = Field(ge=0, description="prompt plus completion tokens")
    units: int = Field(
        ge=0,
        description="images, audio seconds, searches or MCP tool calls, for what is not "
        "counted in tokens",
    )
    cached_tokens: int = Field(ge=0, description="of the prompt tokens, read from the cache")
    reasoning_tokens: int = Field(ge=0, description="of the completion tokens, reasoning")
    audio_tokens: int = Field(ge=0, description="of the prompt tokens, audio")
    cost_nano: int = Field(ge=0, description="what the priced calls cost, in billionths")
    cost: str = Field(description="what the priced calls cost, e.g. '0.0012345'")
    unpriced: int = Field(ge=0, description="calls whose cost is not known: no price covers them")
    audio_output_tokens: int = Field(ge=0, description="of the completion tokens, audio")


class AttendeeWithTotals(AttendeeView, UsageNumbers):
    """An attendee in the event's list: without its key, with its all-time totals."""


class AlertSecret(BaseModel):
    """The event's new alert secret, shown this once."""

    model_config = ANSWER

    secret: str = Field(
        description="the key of the webhook's x-aiproxy-signature (sha256=HMAC-SHA256 of the "
        "body); the previous secret stops signing"
    )
