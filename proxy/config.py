"""Gateway configuration: msgspec Structs, `${VAR:-default}` substitution, errors with YAML paths.

`load_config(path)` reads the YAML file, substitutes environment variables in string values, converts
the result into `GatewayConfig` and checks cross references. Every problem raises `ConfigError`
naming the file, the YAML path (`$.models['openai/gpt-4o-mini'].targets[0].provider`), its line and
what was expected.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

import msgspec
import yaml

NANOS_PER_USD = 1_000_000_000
log = logging.getLogger("proxy.config")

# Endpoint ids of the reference surface: what a model may declare it serves.
ENDPOINT_IDS = frozenset(
    {
        "chat.completions",
        "responses",
        "messages",
        "embeddings",
        "moderations",
        "rerank",
        "audio.speech",
        "audio.transcriptions",
        "audio.translations",
        "images.generations",
        "images.edits",
        "video.generation",
        "music.generate",
        "ocr",
        "batch",
    }
)

OPENAI_KINDS = ("openai", "openai-compatible")
CHAT_KINDS = (*OPENAI_KINDS, "anthropic", "gemini")  # every text endpoint, translated where need be
MUSIC_KINDS = ("suno",)  # a sunoapi.org-style API: music jobs, nothing else
IMAGE_KINDS = (*OPENAI_KINDS, "gemini")  # images.generations: Gemini's image models and Imagen, translated
PROVIDER_KINDS = (*CHAT_KINDS, *MUSIC_KINDS)
# The text-generation surfaces: a model serves all three unless its `endpoints` say otherwise.
TEXT_ENDPOINTS = ("chat.completions", "responses", "messages")


class ConfigError(Exception):
    """A configuration problem, located in its file."""

    def __init__(self, file: str | os.PathLike[str], path: str, message: str, line: int | None = None):
        self.file = str(file)
        self.path = path
        self.message = message
        self.line = line
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")


class _Base(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Policy for every config Struct: unknown keys are errors."""


class ServerConfig(_Base):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 16 * 1024 * 1024
    max_upload_bytes: int = 256 * 1024 * 1024  # a multipart upload (audio, image edits): streamed, never held
    body_timeout_s: float = 30.0  # the longest a client may take to send its request body
    max_header_bytes: int = 16 * 1024  # one request or header line
    max_headers: int = 128
    max_streams_per_key: int = 0  # concurrent streams one API key may hold open; 0: no limit
    # A request head must arrive whole this long after the connection opened or its previous answer ended
    # (also how long an idle keep-alive connection stays open). nginx's client_header_timeout is 60 s.
    header_timeout_s: float = 60.0
    max_connections: int = 10_000  # open client connections per worker process; past it: 503 and close. 0: none
    drain_timeout_s: float = 30.0
    pid_file: str = "./data/gateway.pid"  # written by `serve`, read by `reload`; "" for none
    access_log: bool = False  # one JSON line per request on the `proxy.access` logger
    # Signs download links (videos). Unset: a random key made once per process tree (its workers and
    # reloads share it), so links stop working at a restart and on other instances: set it for those.
    url_signing_key: str = ""


class StoreConfig(_Base):
    url: str = "sqlite:///./data/gateway.db"  # or postgresql://user:password@host:5432/database
    pool_min: int = 1  # Postgres connections each worker process keeps open (SQLite: one, always)
    pool_max: int = 4  # the most each worker process opens


class AuthConfig(_Base):
    cache_ttl_s: float = 5.0  # keys, balances and spend are read from the store again after this
    stale_s: float = 300.0  # while the store cannot be read, cached values are served until this old; 0: never
    min_balance_usd: Decimal = Decimal("1.00")
    # A request in flight holds its worst-case cost (prompt and max_tokens at the model's highest prices), at
    # most this much, against its team's wallet, until its real cost is debited; 0: no holds.
    max_hold_usd: Decimal = Decimal("1.00")

    @property
    def min_balance_nanos(self) -> int:
        return int(self.min_balance_usd * NANOS_PER_USD)

    @property
    def max_hold_nanos(self) -> int:
        return int(self.max_hold_usd * NANOS_PER_USD)


class MetaConfig(_Base):
    always: bool = False


class MetricsConfig(_Base):
    enabled: bool = True


class AccountingConfig(_Base):
    enabled: bool = True  # record every request and debit its cost
    max_backlog: int = 100_000  # records waiting for the store before new requests get 503
    # Each worker appends its records here (a subfolder per store) before answering: a crash loses none.
    journal_dir: str = "./data/journal"
    journal_fsync_s: float = 1.0  # a thread fdatasyncs the journal this often (the power-loss window); 0: never
    # Who writes records to the store: a child process of each worker ("process"), or a thread of the worker
    # ("thread": one process fewer, ~55 µs more CPU a request). An in-memory SQLite store always uses a thread.
    writer: Literal["process", "thread"] = "process"


class SubjectLimits(_Base):
    """Rate limits of each key, or of each team (all its keys together); 0: no limit. Per worker process, or
    across every worker and instance with `rate_limits.url`."""

    rpm: int = 0  # requests a minute
    tpm: int = 0  # tokens a minute (input + output): reserved at admission from an estimate, settled at the end
    concurrency: int = 0  # requests in flight at once


class ModelLimits(_Base):
    """Rate limits of each key, and of each team, on one model: in addition to their limits on all models."""

    key: SubjectLimits = msgspec.field(default_factory=SubjectLimits)
    team: SubjectLimits = msgspec.field(default_factory=SubjectLimits)


class RateLimitsConfig(_Base):
    key: SubjectLimits = msgspec.field(default_factory=SubjectLimits)
    team: SubjectLimits = msgspec.field(default_factory=SubjectLimits)
    models: dict[str, ModelLimits] = {}  # model id → its own limits per key and per team
    # A request's token estimate: its prompt (a token per 4 bytes of body) + its max_tokens (max_completion_tokens,
    # max_output_tokens) or, when it names none, this.
    default_output_tokens: int = 1024
    # redis://host:port/db (rediss:// for TLS): limits and credit holds shared by every worker and instance on it.
    # "": each worker process keeps its own.
    url: str = ""
    timeout_ms: int = 500  # a Redis call slower than this (waiting for a connection, or for the answer) fails
    # Redis down or slow: "local" (each worker applies the limits and holds on its own until Redis answers),
    # "open" (no rate limits, holds per worker), "closed" (503 until Redis answers).
    on_redis_error: Literal["local", "open", "closed"] = "local"
    key_prefix: str = "stats-gateway:"  # the Redis keys' prefix, to share one Redis with other applications


class GuardrailPolicy(_Base):
    """One guardrail: a check, where it runs and what a match does. See docs/guardrails.md."""

    check: Literal["pii", "secrets", "regex", "prompt_tokens", "max_tokens", "models", "webhook"]
    stage: Literal["request", "response", "both"] = "request"  # what it checks (`on` would be YAML's true)
    # block: 400 guardrail_blocked; redact: matches replaced by [KIND] (pii, secrets, regex); log: recorded
    # only; clamp: max_tokens lowered to `max` (max_tokens)
    action: Literal["block", "redact", "log", "clamp"] = "block"
    kinds: list[str] = []  # pii, secrets: only these kinds (EMAIL, CARD, …); []: all the check's kinds
    patterns: dict[str, str] = {}  # regex: name → regular expression (a match's placeholder: [NAME])
    max: int = 0  # prompt_tokens: the most tokens a prompt may have; max_tokens: the ceiling
    allow: list[str] = []  # models: the model ids allowed ([]: any not denied)
    deny: list[str] = []  # models: the model ids refused
    url: str = ""  # webhook: where the texts are POSTed
    headers: dict[str, str] = {}  # webhook: sent with each call (an Authorization header, …)
    timeout_ms: int = 1000  # webhook: the longest wait for its verdict
    on_error: Literal["open", "closed"] = "open"  # webhook down, slow or garbled: let through, or refuse (503)


class GuardrailsConfig(_Base):
    policies: dict[str, GuardrailPolicy] = {}  # name → policy
    default: list[str] = []  # policy names applied to every request
    teams: dict[str, list[str]] = {}  # team name → policy names applied to its requests, in addition
    max_scan_bytes: int = 1_048_576  # a streamed answer's text kept for its response policies (log only)


class TracesConfig(_Base):
    """OpenTelemetry traces (needs the `otel` extra). See docs/telemetry.md."""

    enabled: bool = False
    endpoint: str = ""  # OTLP/HTTP traces URL (…/v1/traces); "": OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT or the SDK's
    headers: dict[str, str] = {}  # sent with each export (an API key); {}: OTEL_EXPORTER_OTLP_(TRACES_)HEADERS
    sample_ratio: float = 1.0  # of traces that start here (an incoming traceparent's sampled flag decides otherwise)
    service_name: str = "stats-gateway"  # OTEL_SERVICE_NAME wins
    # OTLP/HTTP body encoding: http/json (cheap) or http/protobuf (the SDK's exporter); OTEL_EXPORTER_OTLP_PROTOCOL wins
    protocol: Literal["http/json", "http/protobuf"] = "http/json"
    timeout_s: float = 10.0  # one export call
    max_queue: int = 8192  # requests waiting for export (sent 128 at a time, or every 250 ms); beyond, dropped
    capture_content: bool = False  # record prompts and answers (gen_ai.input/output.messages), after redaction
    max_content_chars: int = 16384  # of text per content attribute; the rest is cut


class TelemetryConfig(_Base):
    traces: TracesConfig = msgspec.field(default_factory=TracesConfig)


class DashboardConfig(_Base):
    """The web dashboard at /dashboard. See docs/dashboard.md."""

    enabled: bool = True  # false: none of its routes exists
    session_ttl_s: float = 43200.0  # a sign-in lasts this long (12 hours), unless signed out before
    live_interval_s: float = 1.0  # the requests page's live mode reads new requests this often (per team watched)


class CacheConfig(_Base):
    """The response cache: exact-match answers of chat, responses, messages and embeddings. See docs/cache.md."""

    enabled: bool = False  # for every team and key, unless `teams` or a key's own setting says otherwise
    teams: dict[str, bool] = {}  # team name → on or off
    ttl_s: float = 3600.0  # an entry's life, unless a request asks for less (`x-gateway-cache-ttl`)
    max_ttl_s: float = 86400.0  # the longest a request may ask for
    scope: Literal["team", "global"] = "team"  # global: teams share entries (one answer for the same request)
    max_bytes: int = 67_108_864  # the in-process cache of each worker, bounded in bytes (least recently used out)
    max_entry_bytes: int = 1_048_576  # answers bigger than this are not kept
    wait_s: float = 30.0  # identical requests wait this long for the first one in flight, then go on their own
    hit_price_ratio: Decimal = Decimal(0)  # a hit costs this fraction of what the answer cost (0: free)
    # redis://host:port/db: one cache for every worker and instance (the in-process one stays in front of it)
    url: str = ""
    timeout_ms: int = 100  # a Redis call slower than this is a miss (a WARNING, a metric), never a failure
    compress_above: int = 1024  # entries larger than this are stored in Redis compressed (zlib)
    key_prefix: str = "stats-gateway:cache:"


class Timeouts(_Base):
    connect_s: float = 10.0  # TCP (and TLS) connection
    first_byte_s: float = 300.0  # request sent → response headers (a whole answer, when not streamed)
    idle_s: float = 300.0  # the longest silence between two reads of a response body (stream events)
    total_s: float = 900.0  # the whole exchange, stream included


class BreakerConfig(_Base):
    """Per target (provider + upstream model): `failures` in a row open it for `cooldown_s`, then one probe."""

    failures: int = 5  # 0: never open
    cooldown_s: float = 30.0


class TlsConfig(_Base):
    """A provider's TLS beyond the defaults; certificates and host names are verified whatever is set here."""

    ca_file: str = ""  # PEM CA certificates trusted for this provider instead of the system store
    cert_file: str = ""  # a PEM client certificate to present (mTLS); it may hold its private key too
    key_file: str = ""  # the client certificate's PEM private key, unless cert_file holds it


class ProviderConfig(_Base):
    kind: str
    base_url: str
    api_key: str = ""
    headers: dict[str, str] = {}
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    max_connections: int = 4096  # open connections to this provider per worker: one per stream in flight
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    drop_params: bool = False  # drop request parameters this provider cannot honour instead of answering 400
    strict_params: bool = False  # refuse (400) even the parameters dropped by default (seed, top_k, …)
    team: str = ""  # the team whose own account this provider's key is (it may list the provider's files); "": shared
    # "": HTTPS_PROXY / HTTP_PROXY from the environment unless NO_PROXY names the host; "direct": never a
    # proxy; or http://[user:password@]host:port for this provider, whatever the environment says.
    proxy: str = ""
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)  # file paths relative to the config's folder


class Target(_Base):
    provider: str
    model: str
    weight: float | None = None  # set on any target: requests are spread by weight, the rest are fallbacks


class ModelConfig(_Base):
    targets: list[Target]
    retries: int = 1  # further attempts on the same target after a retryable failure, before the next target
    backoff_s: float = 0.25  # the first retry's mean delay; doubled each time, with full jitter
    max_retry_wait_s: float = 10.0  # the longest Retry-After waited for; a longer one moves to the next target

    @property
    def weighted(self) -> bool:
        """Whether requests are spread over the targets by weight."""
        return any(t.weight for t in self.targets)

    endpoints: list[str] = msgspec.field(default_factory=lambda: list(TEXT_ENDPOINTS))
    aliases: list[str] = []
    owned_by: str = ""
    created: int = 0


class PriceSheet(_Base):
    """USD per million tokens, per request and per unit of media, as written in pricing.yaml."""

    input_per_mtok: Decimal = Decimal(0)
    output_per_mtok: Decimal = Decimal(0)
    cached_input_per_mtok: Decimal | None = None  # unset: cached input costs the input price
    cache_write_per_mtok: Decimal | None = None  # unset: cache writes cost the input price
    reasoning_per_mtok: Decimal | None = None  # unset: reasoning tokens are billed as output
    per_request: Decimal = Decimal(0)
    per_image: Decimal = Decimal(0)  # each image generated or edited
    per_mchar: Decimal = Decimal(0)  # per million characters of text to speech
    per_audio_minute: Decimal = Decimal(0)  # per minute of audio transcribed or translated, or of music made
    per_page: Decimal = Decimal(0)  # each page read by OCR
    per_search: Decimal = Decimal(0)  # each rerank search (unit)
    per_video_second: Decimal = Decimal(0)  # each second of video generated


class ModelPrices(PriceSheet, kw_only=True):
    targets: dict[str, PriceSheet] = {}  # per provider: a whole sheet that replaces the model's


class PricingFile(_Base, kw_only=True):
    currency: str = "USD"
    effective: str  # the date the prices were taken, YYYY-MM-DD
    batch_discount: Decimal = Decimal("0.5")  # batch jobs cost this fraction of the prices (OpenAI: half)
    models: dict[str, ModelPrices] = {}


class PricingConfig(_Base):
    file: str = "pricing.yaml"  # relative to the gateway config's folder


class RouteConfig(_Base):
    method: str
    path: str
    surface: str
    default_model: str = ""


DEFAULT_MODERATION_MODEL = "openai/omni-moderation-latest"


def default_routes(models: dict[str, ModelConfig]) -> list[RouteConfig]:
    """The routes used when the config has no `routes` key: every surface, as the shipped config/gateway.yaml
    routes them (tests/test_config.py keeps the two the same)."""
    moderation = DEFAULT_MODERATION_MODEL if DEFAULT_MODERATION_MODEL in models else ""
    return [
        RouteConfig(method="POST", path="/v1/chat/completions", surface="openai.chat"),
        RouteConfig(method="POST", path="/v1/responses", surface="openai.responses"),
        RouteConfig(method="POST", path="/v1/messages", surface="anthropic.messages"),
        RouteConfig(method="POST", path="/v1/messages/count_tokens", surface="anthropic.count_tokens"),
        RouteConfig(method="POST", path="/v1/embeddings", surface="openai.embeddings"),
        RouteConfig(method="POST", path="/v1/moderations", surface="openai.moderations", default_model=moderation),
        RouteConfig(method="POST", path="/v1/images/generations", surface="openai.images.generations"),
        RouteConfig(method="POST", path="/v1/images/edits", surface="openai.images.edits"),
        RouteConfig(method="POST", path="/v1/audio/speech", surface="openai.audio.speech"),
        RouteConfig(method="POST", path="/v1/audio/transcriptions", surface="openai.audio.transcriptions"),
        RouteConfig(method="POST", path="/v1/audio/translations", surface="openai.audio.translations"),
        RouteConfig(method="POST", path="/v1/rerank", surface="rerank"),
        RouteConfig(method="POST", path="/v1/ocr", surface="ocr"),
        RouteConfig(method="POST", path="/v1/music/generate", surface="music.generate"),
        RouteConfig(method="GET", path="/v1/music/generate/{id}", surface="music.get"),
        RouteConfig(method="POST", path="/v1/videos", surface="openai.videos"),
        RouteConfig(method="GET", path="/v1/videos", surface="openai.videos_list"),
        RouteConfig(method="GET", path="/v1/videos/models", surface="openai.videos_models"),
        RouteConfig(method="GET", path="/v1/videos/{id}", surface="openai.videos_get"),
        RouteConfig(method="DELETE", path="/v1/videos/{id}", surface="openai.videos_delete"),
        RouteConfig(method="GET", path="/v1/videos/{id}/content", surface="openai.videos_content"),
        RouteConfig(method="POST", path="/v1/videos/{id}/download_url", surface="openai.videos_download_url"),
        RouteConfig(method="POST", path="/v1/videos/{id}/cancel", surface="openai.videos_cancel"),
        RouteConfig(method="POST", path="/v1/files", surface="openai.files"),
        RouteConfig(method="GET", path="/v1/files", surface="openai.files_list"),
        RouteConfig(method="GET", path="/v1/files/{id}", surface="openai.files_get"),
        RouteConfig(method="DELETE", path="/v1/files/{id}", surface="openai.files_delete"),
        RouteConfig(method="GET", path="/v1/files/{id}/content", surface="openai.files_content"),
        RouteConfig(method="POST", path="/v1/batches", surface="openai.batches"),
        RouteConfig(method="GET", path="/v1/batches", surface="openai.batches_list"),
        RouteConfig(method="GET", path="/v1/batches/{id}", surface="openai.batches_get"),
        RouteConfig(method="POST", path="/v1/batches/{id}/cancel", surface="openai.batches_cancel"),
        RouteConfig(method="GET", path="/v1/models", surface="openai.models"),
        RouteConfig(method="GET", path="/v1/generations", surface="platform.generations"),
        RouteConfig(method="GET", path="/v1/key", surface="platform.key"),
        RouteConfig(method="GET", path="/v1/credits", surface="platform.credits"),
        RouteConfig(method="GET", path="/v1/pricing/models", surface="platform.pricing_models"),
        RouteConfig(method="POST", path="/v1/pricing/calculate", surface="platform.pricing_calculate"),
        RouteConfig(method="GET", path="/v1/keys", surface="platform.keys_list"),
        RouteConfig(method="POST", path="/v1/keys", surface="platform.keys_create"),
        RouteConfig(method="PATCH", path="/v1/keys/{id}", surface="platform.keys_update"),
        RouteConfig(method="DELETE", path="/v1/keys/{id}", surface="platform.keys_revoke"),
        RouteConfig(method="GET", path="/v1/activity", surface="platform.activity"),
        RouteConfig(method="GET", path="/v1/gateway/models", surface="catalogue.models"),
        RouteConfig(method="GET", path="/v1/gateway/models/me", surface="catalogue.models_me"),
        RouteConfig(method="GET", path="/v1/data/models", surface="catalogue.data_models"),
        RouteConfig(method="GET", path="/v1/providers", surface="catalogue.providers"),
        RouteConfig(method="GET", path="/v1/endpoints", surface="catalogue.endpoints"),
        RouteConfig(method="GET", path="/v1/organisations", surface="catalogue.organisations"),
        RouteConfig(method="GET", path="/v1/workspaces", surface="catalogue.workspaces"),
    ]


class GatewayConfig(_Base):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    meta: MetaConfig = msgspec.field(default_factory=MetaConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    pricing: PricingConfig = msgspec.field(default_factory=PricingConfig)
    accounting: AccountingConfig = msgspec.field(default_factory=AccountingConfig)
    rate_limits: RateLimitsConfig = msgspec.field(default_factory=RateLimitsConfig)
    guardrails: GuardrailsConfig = msgspec.field(default_factory=GuardrailsConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    providers: dict[str, ProviderConfig] = {}
    models: dict[str, ModelConfig] = {}
    routes: list[RouteConfig] = []  # none in the file: default_routes(models)
    source: str = ""  # the file this came from; set by load_config, not read from YAML
    prices: PricingFile | None = None  # the pricing file's contents; set by load_config


# ---------------------------------------------------------------------------------------------------------
# paths

Segment = str | int


def format_path(segments: Iterable[Segment]) -> str:
    out = "$"
    for seg in segments:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", seg):
            out += f".{seg}"
        else:
            out += f"[{seg!r}]"
    return out


def _parse_msgspec_path(text: str) -> list[Segment]:
    """`$.targets[0].port` (a msgspec error path) as segments."""
    segments: list[Segment] = []
    for name, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", text.removeprefix("$")):
        segments.append(name if name else int(index))
    return segments


def _line_of(node: yaml.Node | None, segments: list[Segment]) -> int | None:
    """The 1-based line of the deepest entry found along `segments` (a mapping entry's key line)."""
    line = node.start_mark.line + 1 if node is not None else None
    for seg in segments:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == seg:
                    child, line = value, key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) and seg < len(node.value):
            child = node.value[seg]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


# ---------------------------------------------------------------------------------------------------------
# environment substitution

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def substitute(value: str, env: dict[str, str] | os._Environ[str]) -> str:
    """Replace `${VAR}`, `${VAR:-default}` (unset or empty) and `${VAR-default}` (unset); `$$` is `$`."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op == ":-":
            return current if current else default
        if op == "-":
            return default if current is None else current
        if current is None:
            raise KeyError(name)
        return current

    return _VAR.sub(repl, value)


def _substitute_tree(obj: Any, path: list[Segment], env: Any, fail: Any) -> Any:
    if isinstance(obj, str):
        try:
            return substitute(obj, env)
        except KeyError as e:
            fail(path, f"environment variable {e.args[0]} is not set (write ${{{e.args[0]}:-}} to allow it empty)")
    if isinstance(obj, dict):
        return {k: _substitute_tree(v, [*path, k], env, fail) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute_tree(v, [*path, i], env, fail) for i, v in enumerate(obj)]
    return obj


# ---------------------------------------------------------------------------------------------------------
# loading


Fail = Callable[[list[Segment], str], NoReturn]


def _read(file: Path, env: dict[str, str] | os._Environ[str], what: str) -> tuple[dict[str, Any], Fail]:
    """The YAML mapping in `file`, substituted, and a `fail` that locates errors in it."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(file, "", f"cannot read the {what}: {e.strerror or e}") from None
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(file, "", f"not valid YAML: {getattr(e, 'problem', None) or e}", line) from None
    raw = {} if raw is None else raw

    def fail(segments: list[Segment], message: str) -> NoReturn:
        # msgspec names the object that holds an unknown field; the line is the field's own.
        unknown = re.search(r"unknown field `([^`]+)`", message)
        at = [*segments, unknown.group(1)] if unknown else segments
        raise ConfigError(file, format_path(segments), message, _line_of(root, at))

    if not isinstance(raw, dict):
        fail([], f"expected a mapping at the top level, got {type(raw).__name__}")
    return _substitute_tree(raw, [], env, fail), fail


def _convert_entries(raw: dict[str, Any], entry_types: dict[str, type], fail: Fail) -> None:
    """Convert each entry of the keyed maps alone first, so an error names its key (msgspec says `[...]`)."""
    for section, typ in entry_types.items():
        entries = raw.get(section)
        if isinstance(entries, dict):
            for key, value in entries.items():
                _convert(value, typ, [section, str(key)], fail)


_PROCESS_SIGNING_KEY: Final = secrets.token_urlsafe(32)  # made at import: forked workers inherit it


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> GatewayConfig:
    """Read, substitute, convert and check the config at `path` (and its pricing file)."""
    file = Path(path)
    environ = os.environ if env is None else env
    raw, fail = _read(file, environ, "config file")
    for internal in ("source", "prices"):  # fields of ours, set below, not keys of the file
        if internal in raw:
            fail([internal], f"Object contains unknown field `{internal}`")
    _convert_entries(raw, {"providers": ProviderConfig, "models": ModelConfig}, fail)
    config = _convert(raw, GatewayConfig, [], fail)
    config.source = str(file)
    config.server.url_signing_key = config.server.url_signing_key or _PROCESS_SIGNING_KEY
    if "routes" not in raw:
        config.routes = default_routes(config.models)
    check(config, fail)
    check_egress(config, Path(os.path.abspath(file.parent)), environ, fail)
    pricing = file.parent / config.pricing.file
    if pricing.exists() or "pricing" in raw:  # the default file is optional; a named one is not
        config.prices = load_pricing(pricing, config, environ)
    return config


def load_pricing(file: Path, config: GatewayConfig, env: dict[str, str] | os._Environ[str]) -> PricingFile:
    raw, fail = _read(file, env, "pricing file")
    _convert_entries(raw, {"models": ModelPrices}, fail)
    prices: PricingFile = _convert(raw, PricingFile, [], fail)
    if not 0 < prices.batch_discount <= 1:
        fail(["batch_discount"], f"expected a fraction of the price, 0 < x <= 1, got {prices.batch_discount}")
    try:
        date.fromisoformat(prices.effective)
    except ValueError:
        fail(["effective"], f"expected a date YYYY-MM-DD, got {prices.effective!r}")
    for model_id, model in prices.models.items():
        sheets: list[tuple[list[Segment], PriceSheet]] = [(["models", model_id], model)]
        sheets += [(["models", model_id, "targets", name], sheet) for name, sheet in model.targets.items()]
        for where, sheet in sheets:
            for field in PriceSheet.__struct_fields__:
                value = getattr(sheet, field)
                if value is not None and (value < 0 or not value.is_finite()):
                    fail([*where, field], f"expected a price >= 0 in {prices.currency}, got {value}")
        for name in model.targets:
            served = {t.provider for t in config.models[model_id].targets} if model_id in config.models else set()
            if name not in served:
                fail(
                    ["models", model_id, "targets", name],
                    f"{model_id!r} has no target at provider {name!r} (its providers: {', '.join(sorted(served))})",
                )
        if model_id not in config.models:
            log.warning("%s: prices for %r, which the config does not serve", file, model_id)
    return prices


def _convert(obj: Any, typ: type, prefix: list[Segment], fail: Any) -> Any:
    try:
        return msgspec.convert(obj, typ, strict=False)
    except msgspec.ValidationError as e:
        message, _, where = str(e).partition(" - at ")
        fail([*prefix, *_parse_msgspec_path(where)], message)


def served_by(endpoint: str) -> tuple[str, ...]:
    """The provider kinds that can serve `endpoint`: text at every chat kind, music at `suno` kinds, image
    generations at OpenAI kinds and Gemini, the rest (media, videos, OCR, …) at OpenAI kinds."""
    if endpoint in TEXT_ENDPOINTS:
        return CHAT_KINDS
    if endpoint == "images.generations":
        return IMAGE_KINDS
    return (*MUSIC_KINDS, *OPENAI_KINDS) if endpoint == "music.generate" else OPENAI_KINDS


def check(config: GatewayConfig, fail: Any) -> None:
    """Cross-field checks that the types alone cannot express."""
    server = config.server
    if not 0 <= server.port <= 65535:
        fail(["server", "port"], f"expected a port number 0-65535, got {server.port}")
    if server.workers < 1:
        fail(["server", "workers"], f"expected at least 1 worker, got {server.workers}")
    if server.max_body_bytes < 1024:
        fail(["server", "max_body_bytes"], f"expected at least 1024 bytes, got {server.max_body_bytes}")
    if server.max_upload_bytes < 1024:
        fail(["server", "max_upload_bytes"], f"expected at least 1024 bytes, got {server.max_upload_bytes}")
    if server.drain_timeout_s < 0:
        fail(["server", "drain_timeout_s"], "expected a duration >= 0 seconds")
    if server.body_timeout_s <= 0:
        fail(["server", "body_timeout_s"], "expected a duration > 0 seconds")
    if server.max_header_bytes < 1024:
        fail(["server", "max_header_bytes"], f"expected at least 1024 bytes, got {server.max_header_bytes}")
    if server.max_headers < 16:
        fail(["server", "max_headers"], f"expected at least 16, got {server.max_headers}")
    if server.max_streams_per_key < 0:
        fail(["server", "max_streams_per_key"], "expected 0 (no limit) or more")
    if server.header_timeout_s <= 0:
        fail(["server", "header_timeout_s"], "expected a duration > 0 seconds")
    if server.max_connections < 0:
        fail(["server", "max_connections"], "expected 0 (no limit) or more")
    if config.accounting.max_backlog < 1:
        fail(["accounting", "max_backlog"], "expected at least 1")
    if not config.accounting.journal_dir:
        fail(["accounting", "journal_dir"], "expected a directory (relative to the working directory, or absolute)")
    scopes: list[tuple[list[Segment], ModelLimits | RateLimitsConfig]] = [(["rate_limits"], config.rate_limits)]
    for model_id, limits in config.rate_limits.models.items():
        if model_id not in config.models:
            fail(["rate_limits", "models", model_id], f"unknown model (expected one of: {', '.join(config.models)})")
        scopes.append((["rate_limits", "models", model_id], limits))
    for where, scope in scopes:
        for subject in ("key", "team"):
            for name in ("rpm", "tpm", "concurrency"):
                if getattr(getattr(scope, subject), name) < 0:
                    fail([*where, subject, name], "expected a whole number >= 0 (0: no limit)")
    if config.auth.max_hold_usd < 0:
        fail(["auth", "max_hold_usd"], "expected an amount in USD >= 0 (0: no holds)")
    _check_redis_url(config.rate_limits.url, ["rate_limits", "url"], fail)
    if config.rate_limits.timeout_ms < 1:
        fail(["rate_limits", "timeout_ms"], "expected a duration >= 1 ms")
    if config.rate_limits.default_output_tokens < 1:
        fail(["rate_limits", "default_output_tokens"], "expected a whole number of tokens >= 1")
    _check_guardrails(config.guardrails, config.models, fail)
    _check_cache(config.cache, fail)
    if config.dashboard.session_ttl_s < 60:
        fail(["dashboard", "session_ttl_s"], "expected a duration >= 60 seconds")
    if not 0.1 <= config.dashboard.live_interval_s <= 60:
        fail(["dashboard", "live_interval_s"], "expected a duration from 0.1 to 60 seconds")
    traces = config.telemetry.traces
    if not 0 <= traces.sample_ratio <= 1:
        fail(["telemetry", "traces", "sample_ratio"], f"expected a fraction 0 <= x <= 1, got {traces.sample_ratio}")
    if traces.endpoint and not traces.endpoint.startswith(("http://", "https://")):
        fail(["telemetry", "traces", "endpoint"], "expected an http:// or https:// URL (OTLP/HTTP, …/v1/traces)")
    if traces.timeout_s <= 0 or traces.max_queue < 1:
        fail(["telemetry", "traces", "timeout_s" if traces.timeout_s <= 0 else "max_queue"], "expected a value > 0")
    if config.accounting.journal_fsync_s < 0:
        fail(["accounting", "journal_fsync_s"], "expected a duration >= 0 seconds (0: never fsync)")
    if config.auth.cache_ttl_s < 0:
        fail(["auth", "cache_ttl_s"], "expected a duration >= 0 seconds")
    if config.auth.stale_s < 0:
        fail(["auth", "stale_s"], f"expected a duration >= 0 seconds (0: never serve stale), got {config.auth.stale_s}")
    store = config.store
    if not store.url.startswith(("sqlite://", "postgresql://", "postgres://")):
        from proxy.store.base import redact_url

        fail(
            ["store", "url"],
            f"expected a sqlite:///path or postgresql://user:password@host/database URL, got {redact_url(store.url)!r}",
        )
    if store.pool_min < 0:
        fail(["store", "pool_min"], f"expected 0 or more connections, got {store.pool_min}")
    if not store.pool_max >= max(store.pool_min, 1):
        fail(
            ["store", "pool_max"], f"expected at least 1 and at least pool_min ({store.pool_min}), got {store.pool_max}"
        )

    for name, provider in config.providers.items():
        where = ["providers", name]
        if provider.drop_params and provider.strict_params:
            fail([*where, "strict_params"], "expected at most one of drop_params and strict_params to be true")
        if provider.kind not in PROVIDER_KINDS:
            fail(
                [*where, "kind"],
                f"unknown provider kind {provider.kind!r} (expected one of: {', '.join(PROVIDER_KINDS)})",
            )
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", provider.base_url):
            fail([*where, "base_url"], f"expected an http(s) URL, got {provider.base_url!r}")
        for field in Timeouts.__struct_fields__:
            if getattr(provider.timeouts, field) <= 0:
                fail([*where, "timeouts", field], "expected a duration > 0 seconds")
        if provider.max_connections < 1:
            fail([*where, "max_connections"], "expected at least 1")
        if provider.breaker.failures < 0:
            fail([*where, "breaker", "failures"], "expected 0 (never open) or more")
        if provider.breaker.cooldown_s <= 0:
            fail([*where, "breaker", "cooldown_s"], "expected a duration > 0 seconds")

    providers = sorted(config.providers)
    for model_id, model in config.models.items():
        where: list[Segment] = ["models", model_id]
        if not model.targets:
            fail([*where, "targets"], "expected at least one target")
        for i, target in enumerate(model.targets):
            if target.provider not in config.providers:
                fail(
                    [*where, "targets", i, "provider"],
                    f"unknown provider {target.provider!r} (expected one of: {', '.join(providers) or 'none defined'})",
                )
            if target.weight is not None and not target.weight > 0:
                fail([*where, "targets", i, "weight"], f"expected a weight > 0, got {target.weight}")
        if model.retries < 0:
            fail([*where, "retries"], f"expected 0 or more retries, got {model.retries}")
        for field in ("backoff_s", "max_retry_wait_s"):
            if getattr(model, field) < 0:
                fail([*where, field], "expected a duration >= 0 seconds")
        for i, endpoint in enumerate(model.endpoints):
            if endpoint not in ENDPOINT_IDS:
                fail(
                    [*where, "endpoints", i],
                    f"unknown endpoint {endpoint!r} (expected one of: {', '.join(sorted(ENDPOINT_IDS))})",
                )
            kinds = served_by(endpoint)
            for target in model.targets:
                kind = config.providers[target.provider].kind
                if kind not in kinds:
                    names = (
                        "OpenAI-kind providers" if kinds == OPENAI_KINDS else f"providers of kind {', '.join(kinds)}"
                    )
                    fail(
                        [*where, "endpoints", i],
                        f"{endpoint} is served by {names} only; provider {target.provider!r} is {kind}",
                    )

    seen: dict[tuple[str, str], int] = {}
    for i, route in enumerate(config.routes):
        route.method = route.method.upper()
        if not route.path.startswith("/"):
            fail(["routes", i, "path"], f"expected a path starting with '/', got {route.path!r}")
        key = (route.method, route.path)
        if key in seen:
            fail(["routes", i], f"duplicate route {route.method} {route.path} (also routes[{seen[key]}])")
        seen[key] = i
        if route.default_model and route.default_model not in config.models:
            fail(["routes", i, "default_model"], f"unknown model {route.default_model!r}")


def check_egress(config: GatewayConfig, folder: Path, env: Any, fail: Any) -> None:
    """Each provider's proxy and TLS files, as its connections will use them (relative paths made absolute)."""
    from proxy.egress import Egress, SettingError

    for name, provider in config.providers.items():
        tls = provider.tls
        for field in TlsConfig.__struct_fields__:
            path = getattr(tls, field)
            if path:
                setattr(tls, field, str(folder / Path(path).expanduser()))  # an absolute path stays itself
        try:
            Egress(provider.base_url, provider, environ=env)
        except SettingError as e:
            fail(["providers", name, *e.field], e.message)
        if any(getattr(tls, field) for field in TlsConfig.__struct_fields__) and provider.base_url.startswith("http:"):
            log.warning("%s: providers.%s.tls is set but its base_url is http://: no TLS is used", config.source, name)


def fail_at(config: GatewayConfig, segments: list[Segment], message: str) -> None:
    """Raise a ConfigError for a check made after loading (e.g. by the route table)."""
    root = None
    if config.source:
        try:
            root = yaml.compose(Path(config.source).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            root = None
    raise ConfigError(config.source or "<config>", format_path(segments), message, _line_of(root, segments))


def _check_guardrails(guardrails: GuardrailsConfig, models: Mapping[str, Any], fail: Fail) -> None:
    """Each policy's settings make sense for its check; every policy a list names exists."""
    from proxy.guardrails.detect import KINDS, Detector

    actions = {
        "pii": ("block", "redact", "log"),
        "secrets": ("block", "redact", "log"),
        "regex": ("block", "redact", "log"),
        "prompt_tokens": ("block", "log"),
        "max_tokens": ("clamp", "block"),
        "models": ("block",),
        "webhook": ("block", "log"),
    }
    for name, policy in guardrails.policies.items():
        where: list[Segment] = ["guardrails", "policies", name]
        check = policy.check
        if policy.action not in actions[check]:
            fail([*where, "action"], f"expected one of {', '.join(actions[check])} for a {check} check")
        if policy.stage != "request" and check in ("prompt_tokens", "max_tokens", "models"):
            fail([*where, "stage"], f"a {check} check runs on requests only: expected `request`")
        if check in ("pii", "secrets"):
            for i, kind in enumerate(policy.kinds):
                if kind not in KINDS[check]:
                    fail([*where, "kinds", i], f"expected one of {', '.join(KINDS[check])}, got {kind!r}")
        elif check == "regex":
            if not policy.patterns:
                fail([*where, "patterns"], "expected at least one `name: regular expression`")
            try:
                Detector((), policy.patterns)
            except ValueError as e:
                fail([*where, "patterns"], str(e))
        elif check in ("prompt_tokens", "max_tokens") and policy.max < 1:
            fail([*where, "max"], "expected a whole number of tokens >= 1")
        elif check == "models":
            if not policy.allow and not policy.deny:
                fail(where, "expected `allow` or `deny`: a list of model ids")
            for field in ("allow", "deny"):
                for i, model in enumerate(getattr(policy, field)):
                    if model not in models:
                        fail([*where, field, i], f"unknown model {model!r} (expected one of: {', '.join(models)})")
        elif check == "webhook":
            if not policy.url.startswith(("http://", "https://")):
                fail([*where, "url"], "expected an http:// or https:// URL")
            if policy.timeout_ms < 1:
                fail([*where, "timeout_ms"], "expected a duration >= 1 ms")
    known = set(guardrails.policies)
    lists: list[tuple[list[Segment], list[str]]] = [(["guardrails", "default"], guardrails.default)]
    lists += [(["guardrails", "teams", team], names) for team, names in guardrails.teams.items()]
    for where, names in lists:
        for i, name in enumerate(names):
            if name not in known:
                fail([*where, i], f"unknown policy {name!r} (expected one of: {', '.join(known) or 'none defined'})")
    if guardrails.max_scan_bytes < 0:
        fail(["guardrails", "max_scan_bytes"], "expected a size in bytes >= 0")


def _check_cache(cache: CacheConfig, fail: Fail) -> None:
    if cache.ttl_s <= 0:
        fail(["cache", "ttl_s"], "expected a duration > 0 seconds")
    if cache.max_ttl_s < cache.ttl_s:
        fail(["cache", "max_ttl_s"], f"expected a duration >= ttl_s ({cache.ttl_s:g} s)")
    if cache.max_bytes < 0 or cache.max_entry_bytes < 1:
        fail(["cache", "max_bytes" if cache.max_bytes < 0 else "max_entry_bytes"], "expected a size in bytes >= 1")
    if cache.wait_s < 0:
        fail(["cache", "wait_s"], "expected a duration >= 0 seconds (0: never wait)")
    if not 0 <= cache.hit_price_ratio <= 1:
        fail(["cache", "hit_price_ratio"], f"expected a fraction 0 <= x <= 1, got {cache.hit_price_ratio}")
    _check_redis_url(cache.url, ["cache", "url"], fail)
    if cache.timeout_ms < 1:
        fail(["cache", "timeout_ms"], "expected a duration >= 1 ms")


def _check_redis_url(url: str, where: list[Segment], fail: Fail) -> None:
    """A Redis URL, when one is set (its password never in the message)."""
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        from proxy.store.base import redact_url

        fail(where, f"expected a redis://[:password@]host:port/db URL (or rediss://, unix://), got {redact_url(url)!r}")
