"""What a failed Redis call means: only store-level failures mark the store down."""

import pytest
from pydantic import ValidationError
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    DataError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from recsvc.config import Settings
from recsvc.store.errors import StoreFull, StoreRequestError, StoreUnavailable, classify


@pytest.mark.parametrize(
    "exc, kind",
    [
        (ConnectionError("Connection refused"), StoreUnavailable),
        (TimeoutError("Timeout reading from socket"), StoreUnavailable),
        (ConnectionResetError(104, "reset"), StoreUnavailable),
        (BusyLoadingError("Redis is loading the dataset in memory"), StoreUnavailable),
        (ReadOnlyError("You can't write against a read only replica."), StoreUnavailable),
        (ResponseError("BUSY Redis is busy running a script."), StoreUnavailable),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots"), StoreUnavailable),
        (ResponseError("MASTERDOWN Link with MASTER is down"), StoreUnavailable),
        (ResponseError("Error running script (call to f_1): @user_script:12: -READONLY You "
                       "can't write against a read only replica."), StoreUnavailable),
        # (#12) WAIT sent to a node a failover just demoted: no code, only this text
        (ResponseError("WAIT cannot be used with replica instances. Please also note that "
                       "since Redis 4.0 if a replica is configured to be writable..."),
         StoreUnavailable),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), StoreFull),
        (ResponseError("Error running script: @user_script:1: -OOM command not allowed"),
         StoreFull),
        (ResponseError("ERR Error running script (call to f_1): @user_script:22: ERR value is "
                       "NaN or Infinity"), StoreRequestError),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
         StoreRequestError),
        (DataError("Invalid input of type: 'NoneType'"), StoreRequestError),
        # our script's refusal quotes client data: a word in it must not mislead
        (ResponseError("RECSVC_INVALID event 1 (id READONLY): value, weight and timestamp "
                       "must be finite numbers"), StoreRequestError),
    ],
)  # fmt: skip
def test_classify(exc, kind):
    error = classify(exc)
    assert type(error) is kind
    if kind is StoreRequestError:
        assert len(error.error_id) == 12
        assert error.invalid == str(exc).startswith("RECSVC_INVALID")


@pytest.mark.parametrize(
    "overrides",
    [
        {"event_weights": {"click": 1e308}},
        {"event_weights": {"rating": float("inf")}},
        {"event_weights": {"view": float("nan")}},
        {"rating_midpoint": float("nan")},
        {"blend_weight": float("inf")},
        {"max_event_weight": 1e300},
    ],
)
def test_settings_refuse_non_finite_and_unbounded_numbers(overrides):
    with pytest.raises(ValidationError):
        Settings(**overrides)
