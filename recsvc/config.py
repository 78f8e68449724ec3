"""Every setting of recsvc, typed, from flags and ``RECSVC_*`` environment variables.

Build one :class:`Settings` in the entry point (``Settings(**overrides)``) and
pass it down; nothing reads ``os.environ`` elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Default weight of each event type when building the interaction matrix and
# updating user state. Negative feedback gets a negative weight, so it never
# counts as a like and pushes similar items down.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 4.0,
    "purchase": 8.0,
    "like": 4.0,
    "rating": 1.0,  # multiplied by (value - rating_midpoint)
    "dislike": -4.0,
    "skip": -1.0,
    "remove_from_cart": -2.0,
}

# Hard bounds on what the settings may allow: a user's summed weight stays far
# from float overflow (Redis refuses a HINCRBYFLOAT that gives inf).
MAX_EVENT_VALUE = 1e9
MAX_EVENT_WEIGHT = 1e6


class Settings(BaseSettings):
    """Service settings; each field can be set by ``RECSVC_<FIELD>`` or a CLI flag."""

    # allow_inf_nan=False: no float setting may be NaN or infinite
    model_config = SettingsConfigDict(env_prefix="RECSVC_", extra="ignore", allow_inf_nan=False)

    # Serving
    model: Path | None = Field(None, description="model bundle directory")
    host: str = Field("[::]", description="address to listen on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    workers: int = Field(1, ge=1, le=64, description="serving processes sharing the port")
    reuse_port: bool = Field(
        False, description="bind with SO_REUSEPORT (set for each of several workers)"
    )
    redis_url: str | None = Field(
        None,
        description="redis://, rediss:// or unix:// URL; unset starts an embedded Redis",
    )
    data_dir: Path = Field(
        Path("recsvc-data"), description="where the embedded Redis keeps its files"
    )
    redis_appendfsync: str = Field(
        "always",
        pattern="^(always|everysec|no)$",
        description="AOF fsync policy of the embedded Redis (always: acks are durable)",
    )
    redis_timeout_s: float = Field(0.5, gt=0, description="Redis socket timeout")
    state_cache_items: int = Field(
        500_000,
        ge=0,
        description="per-process cache of users' Redis state, in history items (0: off); "
        "kept exact by Redis client-side caching invalidations",
    )
    latent_cache_users: int = Field(
        50_000,
        ge=0,
        description="per-process cache of users' generator latents (0: off); exact, keyed by "
        "generator version and the user's event count",
    )
    # Redis Cluster and replicated acks (#12)
    redis_cluster: bool = Field(
        False, description="--redis-url names a Redis Cluster node: use the cluster client"
    )
    redis_wait_replicas: int = Field(
        0, ge=0, description="acknowledge feedback only once this many replicas have it (WAIT)"
    )
    redis_wait_timeout_ms: int = Field(
        250, ge=1,
        description="how long WAIT may take before the write counts as failed "
        "(below the Redis socket timeout)",
    )  # fmt: skip
    health_interval_s: float = Field(1.0, gt=0, description="Redis health probe period")
    model_watch_s: float = Field(
        5.0, ge=0, description="poll the model directory for a new bundle this often (0: off)"
    )
    grace_s: float = Field(5.0, ge=0, description="shutdown grace period for in-flight calls")

    # Request limits
    max_k: int = Field(1000, ge=1, description="largest k a request may ask for")
    max_events_per_request: int = Field(1000, ge=1, description="events in one SendFeedback")
    max_id_length: int = Field(256, ge=1, description="longest user/item/event id accepted")
    stream_buffer: int = Field(
        2000, ge=1, description="events a StreamFeedback call may hold before reading pauses"
    )
    stream_batch: int = Field(500, ge=1, description="most events written in one round trip")
    max_filter_ids: int = Field(10_000, ge=0, description="exclude/restrict ids per request")

    # User state
    history_cap: int = Field(500, ge=1, description="feedback items kept per user (most recent)")
    dedup_window: int = Field(
        10_000, ge=1, description="event ids remembered per user for idempotency"
    )
    user_ttl_s: int = Field(30 * 86400, ge=1, description="idle user state expires after this")
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    rating_midpoint: float = Field(
        3.0, ge=-MAX_EVENT_VALUE, le=MAX_EVENT_VALUE, description="ratings above it are positive"
    )
    max_event_value: float = Field(
        MAX_EVENT_VALUE, gt=0, le=MAX_EVENT_VALUE,
        description="largest |value| a feedback event may carry (a rating, say)",
    )  # fmt: skip
    max_event_weight: float = Field(
        1000.0, gt=0, le=MAX_EVENT_WEIGHT,
        description="largest |weight| one feedback event may add to a user's state, after "
        "weighting (type weight, times value - rating_midpoint for ratings)",
    )  # fmt: skip
    max_event_age_s: int = Field(
        10 * 366 * 86400, ge=1, description="oldest event timestamp accepted, before now"
    )
    max_event_skew_s: int = Field(
        86400, ge=0, description="latest event timestamp accepted, after now (client clocks)"
    )
    stream_maxlen: int = Field(
        0, ge=0, description="approximate cap on the feedback stream (0: no cap)"
    )

    # Generator
    default_strategy: str = Field(
        "", description="cf, generator or blend; empty: blend when a generator is loaded"
    )
    blend_weight: float = Field(
        0.5, ge=0, le=1, description="generator weight in blend, unless the bundle tuned one"
    )
    max_generate: int = Field(100, ge=1, description="largest n a Generate may ask for")
    # issue #15: Generate's per-user state (item logits, content profile) per process
    generate_cache_mb: int = Field(
        64, ge=0, description="per-process cache of Generate's per-user state, MiB (0: off)"
    )

    # Online metrics: impressions, attribution, A/B variants, Prometheus (#13)
    impression_sample_rate: float = Field(
        1.0, ge=0, le=1,
        description="share of Recommend/Generate responses logged as impressions (by a hash "
        "of the recommendation id, so a report can tell unsampled lists apart)",
    )  # fmt: skip
    impression_retention_s: int = Field(
        14 * 86400, ge=60, description="impressions older than this are trimmed from the log"
    )
    impression_maxlen: int = Field(
        5_000_000, ge=1000, description="approximate cap on the impression log's length"
    )
    impression_queue: int = Field(
        20_000, ge=1, description="impressions waiting to be written; beyond it they are dropped "
        "(and counted), never waited for",
    )  # fmt: skip
    impression_flush_s: float = Field(
        0.25,
        gt=0,
        le=10,
        description="longest an impression waits before its batch is written (each write has a "
        "fixed cost, ~0.5 ms of CPU on a loaded machine: fewer, larger batches cost less)",
    )
    attribution_window_s: int = Field(
        86400, ge=1, description="feedback later than this after its impression counts as late"
    )
    variants: Path | None = Field(None, description="A/B variants file (JSON or TOML)")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="serve Prometheus metrics on this port (0: off)"
    )
    metrics_dir: Path | None = Field(
        None,
        description="where each of --workers N writes its metrics for the parent to serve "
        "(default: DATA_DIR/metrics)",
    )
    metrics_worker: bool = Field(
        False, description="set by the parent for its workers: write metrics, do not serve them"
    )

    log_level: str = Field("INFO")

    # Issue #14: safe to put in front of a platform
    embedded_redis_restarts: int = Field(
        10, ge=0, description="restarts of a dead embedded Redis allowed within a minute, "
        "with back-off (0: never restart it)",
    )  # fmt: skip
    auth_tokens_file: Path | None = Field(
        None, description="bearer tokens, one 'ROLE TOKEN [NAME]' per line (roles admin, "
        "client); unset: no authorisation",
    )  # fmt: skip
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve TLS only")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    max_in_flight: int = Field(
        256, ge=0, description="calls in progress per serving process beyond which new ones "
        "are refused at once with RESOURCE_EXHAUSTED (0: no limit). Sized so that a Redis "
        "stall of ~150 ms (an fsync during an AOF rewrite) at the capacity of ~1,500 calls/s "
        "is waited out, not refused (BENCHMARKS.md, soak)",
    )  # fmt: skip
    max_queue_ms: float = Field(
        0.0, ge=0, description="refuse unary calls with RESOURCE_EXHAUSTED while the event "
        "loop has been busy without a pause for longer than this (CPU overload: the backlog "
        "waits in gRPC's core) (0: never). Bounds the admitted calls' latency, at a cost in "
        "calls served: a refusal costs about half a served call (BENCHMARKS.md)",
    )  # fmt: skip
    max_pending_calls: int = Field(
        0, ge=0, description="calls gRPC's core may hold before Python takes them; beyond "
        "it core refuses new ones (as CANCELLED) instead of queueing them (0: core's default)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return self

    @model_validator(mode="after")
    def _wait_within_socket_timeout(self) -> Settings:  # (#12)
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_timeout_s * 1000:
            raise ValueError(
                f"redis_wait_timeout_ms ({self.redis_wait_timeout_ms}) must be below the "
                f"Redis socket timeout ({self.redis_timeout_s * 1000:g} ms)"
            )
        return self

    @field_validator("event_weights")
    @classmethod
    def _known_event_types(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(DEFAULT_EVENT_WEIGHTS)
        if unknown:
            raise ValueError(
                f"unknown event types {sorted(unknown)}; known: {sorted(DEFAULT_EVENT_WEIGHTS)}"
            )
        out_of_range = {k: w for k, w in value.items() if not abs(w) <= MAX_EVENT_WEIGHT}
        if out_of_range:
            raise ValueError(
                f"event weights must be finite and within +-{MAX_EVENT_WEIGHT:g}: {out_of_range}"
            )
        return {**DEFAULT_EVENT_WEIGHTS, **value}


def redact_url(url: str | None) -> str:
    """The URL with any password replaced by ``***``, for logs."""
    if not url or "@" not in url:
        return str(url)
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
