"""The one exception tree of loraburst.

::

    LoraburstError
    ├── ConfigError (also ValueError)         bad spec, YAML, argument or unknown name
    │   ├── DatasetError                      rows that fail validation (file:line for each)
    │   └── EstimateError                     unknown GPU / model shape, job that fits nowhere
    ├── ProviderError                         a provider API said no
    │   ├── AuthError                         bad or missing API key
    │   ├── CapacityError                     no capacity for the offer (retryable elsewhere)
    │   ├── RateLimitError                    429 that outlived our retries
    │   └── ProviderAPIError                  any other API failure (5xx, malformed reply)
    ├── TransportError                        SSH/SFTP: not ready, host key changed, dropped
    │   └── HostKeyMismatchError              stops at once: never retried, never failed over
    ├── AgentError                            the on-instance agent failed or vanished
    ├── ArtifactError                         a pulled artifact is unlisted, unsafe or corrupt
    ├── LocalStorageError                     this machine could not write (disk full, quota,
    │                                         read-only, permission): not a dropped connection
    ├── TeardownError                         an instance could not be confirmed gone
    └── JobError                              a job did not produce its adapter
        ├── JobCancelledError                 Ctrl-C / SIGTERM
        ├── BudgetExceededError               refused before launch, or cap hit at runtime
        ├── InstanceLostError                 the instance was preempted or vanished
        └── PlacementError                    every offer in the chain failed (has a table)

Every error carries the context it has (job id, provider, file and row) as attributes;
foreign exceptions (httpx, paramiko, OSError) are translated only at their boundary, with
``raise ... from``. Messages never contain secrets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AgentError",
    "ArtifactError",
    "AuthError",
    "BudgetExceededError",
    "CapacityError",
    "ConfigError",
    "DatasetError",
    "EstimateError",
    "HostKeyMismatchError",
    "InstanceLostError",
    "JobCancelledError",
    "JobError",
    "LocalStorageError",
    "LoraburstError",
    "PlacementError",
    "ProviderAPIError",
    "ProviderError",
    "RateLimitError",
    "TeardownError",
    "TransportError",
]


class LoraburstError(Exception):
    """Root of every error loraburst raises on purpose."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        return self.message


class ConfigError(LoraburstError, ValueError):
    """The job spec, a YAML file or an argument is invalid."""


class DatasetError(ConfigError):
    """Dataset rows failed validation.

    Attributes:
        problems: every problem found, each ``"file:line: what is wrong"``.
    """

    MAX_SHOWN = 20

    def __init__(self, problems: Sequence[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        shown = self.problems[: self.MAX_SHOWN]
        lines = [f"dataset {source or ''} has {len(self.problems)} problem(s):".replace("  ", " ")]
        lines += [f"  {p}" for p in shown]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        super().__init__("\n".join(lines), source=source)


class EstimateError(ConfigError):
    """The estimator cannot place the job (unknown GPU or model, or nothing fits)."""


class ProviderError(LoraburstError):
    """A provider's API refused or failed a request."""

    def __init__(self, message: str, *, provider: str | None = None, **context: Any) -> None:
        super().__init__(message, provider=provider, **context)
        self.provider = provider


class AuthError(ProviderError):
    """The API key is missing, invalid or expired."""


class CapacityError(ProviderError):
    """The provider has no capacity for this offer right now; another offer may work."""


class RateLimitError(ProviderError):
    """The provider kept answering 429 after our bounded retries."""


class ProviderAPIError(ProviderError):
    """Any other provider API failure (5xx after retries, malformed response)."""


class TransportError(LoraburstError):
    """SSH/SFTP to the instance failed (never ready, dropped, refused)."""


class HostKeyMismatchError(TransportError):
    """The instance presented a different host key than the one pinned on first connect."""


class AgentError(LoraburstError):
    """The on-instance agent reported failure or stopped without finishing."""


class ArtifactError(LoraburstError):
    """A pulled artifact does not match its manifest: a missing, unlisted or corrupt file, a
    malformed manifest, or a name from the instance that would land outside its folder."""


class LocalStorageError(LoraburstError):
    """A file on this machine could not be written or read (disk full, quota, read-only file
    system, permission). Never a transport error: reconnecting cannot fix it.

    Attributes:
        path: the local path that failed.
        errno: the ``OSError``'s errno (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES`` ...).
    """

    def __init__(
        self, message: str, *, path: str | None = None, errno: int | None = None, **context: Any
    ) -> None:
        super().__init__(message, path=path, errno=errno, **context)
        self.path = path
        self.errno = errno


class TeardownError(LoraburstError):
    """An instance could not be confirmed terminated; run ``loraburst cleanup``."""


class JobError(LoraburstError):
    """A job ended without its adapter."""


class JobCancelledError(JobError):
    """The job was cancelled (Ctrl-C or SIGTERM); its instance was torn down."""


class BudgetExceededError(JobError):
    """The job's estimate exceeds ``max_cost`` (before launch) or the cap was hit."""


class InstanceLostError(JobError):
    """The instance was preempted or vanished mid-run. ``Job.run`` relaunches and resumes from
    the last checkpoint by itself; this reaches the caller only when that is not possible."""


class PlacementError(JobError):
    """Every offer of the placement chain failed.

    Attributes:
        attempts: one ``(provider, gpu, reason)`` row per offer tried.
    """

    def __init__(self, message: str, attempts: Sequence[tuple[str, str, str]]) -> None:
        self.attempts = list(attempts)
        table = "\n".join(f"  {p:<10} {g:<28} {r}" for p, g, r in self.attempts)
        super().__init__(f"{message}\n{table}" if table else message)
