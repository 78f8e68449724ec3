"""Domain errors. The gRPC layer maps each to a status code; nothing else here knows gRPC."""


class RecsvcError(Exception):
    """Base class; ``code`` names the gRPC status the servicer returns."""

    code = "INTERNAL"


class InvalidArgument(RecsvcError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(RecsvcError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class Unavailable(RecsvcError):
    code = "UNAVAILABLE"


class ResourceExhausted(RecsvcError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(RecsvcError):
    code = "FAILED_PRECONDITION"


class Internal(RecsvcError):
    """A failure that is neither the caller's fault nor a store outage; the
    message carries an error id that the server log has too."""

    code = "INTERNAL"
