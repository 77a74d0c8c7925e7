"""Every error Safehold raises on purpose, in one place.

```text
SafeholdError                    base; carries a stable `code` and an HTTP `status`
├── ConfigError                  the config file or environment is invalid (start-up)
├── Unauthorized        (401)    no bearer token, or one that does not verify
├── Forbidden           (403)    a valid token without the role the route needs
├── BadRequest          (400)    client input is malformed
│   └── InvalidBackupName        a backup name does not follow the naming grammar
│       └── ImpossibleBackupName (404) in the grammar, but its timestamp cannot exist
├── NotFound            (404)    unknown target, backup or job
├── Unprocessable       (422)    well-formed, but not for this target (e.g. no retention)
├── Conflict            (409)    the request clashes with the current state
├── EngineError         (500)    a driver or subprocess failed
│   ├── ToolTooOld               the dump tool is older than the server
│   ├── DumpFailed               the dump did not complete
│   ├── RestoreFailed            the restore did not complete
│   └── SafetyBackupFailed       a restore's safety backup failed; nothing was touched
└── PipelineError       (500)    compression, hashing or storage failed
    └── IntegrityError  (422)    a stored backup does not match its manifest's sha256
```
Messages are shown to clients: they must never contain a secret (see `shared.redact`).
"""

from __future__ import annotations

from typing import NotRequired, TypedDict


class ErrorDoc(TypedDict):
    """An error as every surface answers it: `{"error": {"code", "message"}}`."""

    code: str
    message: str
    window: NotRequired[dict[str, object]]  # outside_window: the recovery window


class SafeholdError(Exception):
    """Base of every deliberate Safehold error."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, object] = {}  # extra fields for the job record's `error`
        self.headers: dict[str, str] = {}  # extra HTTP response headers
        if code is not None:
            self.code = code

    def to_dict(self) -> ErrorDoc:
        return {"code": self.code, "message": self.message}


class ConfigError(SafeholdError):
    """Raised at start-up when the config file or a SAFEHOLD_* override is invalid."""

    code = "config_error"


class Unauthorized(SafeholdError):
    """Raised when a request has no bearer token or its token does not verify."""

    code = "unauthorized"
    status = 401

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        error = ' error="invalid_token"' if self.code == "invalid_token" else ""
        self.headers = {"WWW-Authenticate": f'Bearer realm="safehold"{error}'}


class Forbidden(SafeholdError):
    """Raised when a valid token lacks the role (or target) a route needs."""

    code = "forbidden"
    status = 403


class Unavailable(SafeholdError):
    """Raised when a request needs a worker or service that is not running."""

    code = "unavailable"
    status = 503


class TooLarge(SafeholdError):
    """Raised when an upload exceeds the configured size limit."""

    code = "too_large"
    status = 413


class TooMany(SafeholdError):
    """Raised when a caller holds too many long-lived requests (streams, waits) at once."""

    code = "too_many_streams"
    status = 429


class BadRequest(SafeholdError):
    """Raised when a client's request is malformed."""

    code = "bad_request"
    status = 400


class InvalidBackupName(BadRequest):
    """Raised when a client-supplied backup name does not follow the naming grammar."""

    code = "invalid_backup_name"


class ImpossibleBackupName(InvalidBackupName):
    """A name in the grammar whose timestamp no clock shows (a 30th of February): no such
    backup can exist, so it is not found rather than malformed."""

    code = "backup_not_found"
    status = 404


class NotFound(SafeholdError):
    """Raised when a target, backup or job does not exist."""

    code = "not_found"
    status = 404


class Unprocessable(SafeholdError):
    """Raised for a well-formed request this target cannot do (an option of another engine,
    a prune without a retention policy)."""

    code = "unprocessable"
    status = 422


class OutsideWindow(Unprocessable):
    """A point in time the archive cannot reach: the answer carries the window."""

    code = "outside_window"

    def __init__(self, message: str, window: dict[str, object]) -> None:
        super().__init__(message)
        self.window = window

    def to_dict(self) -> ErrorDoc:
        return {**super().to_dict(), "window": self.window}


class Conflict(SafeholdError):
    """Raised when a request clashes with the current state (e.g. cancelling a finished job)."""

    code = "conflict"
    status = 409


class EngineError(SafeholdError):
    """Raised when a database driver or a dump/restore subprocess fails."""

    code = "engine_error"


class ToolTooOld(EngineError):
    """Raised when the installed dump tool is older than the database server."""

    code = "tool_too_old"


class DumpFailed(EngineError):
    """Raised when a dump did not complete."""

    code = "dump_failed"


class RestoreFailed(EngineError):
    """Raised when a restore did not complete.

    `database_unchanged` is True when the engine knows the target was left as it was
    (e.g. PostgreSQL rolled the single transaction back).
    """

    code = "restore_failed"

    def __init__(self, message: str, *, database_unchanged: bool = False,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.database_unchanged = database_unchanged


class SafetyBackupFailed(EngineError):
    """Raised when a restore's safety backup cannot be made: the restore did not start."""

    code = "safety_backup_failed"


class PipelineError(SafeholdError):
    """Raised when compression, hashing or storage fails."""

    code = "pipeline_error"


class IntegrityError(PipelineError):
    """Raised when a stored backup's bytes do not match the sha256 in its manifest."""

    code = "checksum_mismatch"
    status = 422


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that found no space left (ENOSPC): the operator's to fix
    (free space or prune), answered as `storage_full`, never an internal error."""
    import errno

    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC
