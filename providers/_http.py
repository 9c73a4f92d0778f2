"""The one request helper both clouds use: auth header, bounded retries, errors mapped once.

``ApiClient.request`` sends one JSON request over the injected ``httpx.Client`` and turns every
failure into the error tree: 401/403 -> ``AuthError``; a capacity refusal -> ``CapacityError``
carrying the provider's own message; 429, 5xx and timeouts -> retries with exponential backoff
and full jitter (``Retry-After`` honoured), then ``RateLimitError`` / ``ProviderAPIError``.
Requests that create something are sent with ``idempotent=False``: only refusals that certainly
created nothing (429, a connection never made) are retried, so a lost reply never doubles a pod.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from loraburst._exceptions import (
    AuthError,
    CapacityError,
    ProviderAPIError,
    ProviderError,
    RateLimitError,
)
from pydantic import SecretStr

__all__ = ["ApiClient", "client_or_error", "resolve_key"]

log = logging.getLogger("loraburst.providers")


def resolve_key(
    provider: str, api_key: str | SecretStr | None, env_vars: Sequence[str]
) -> SecretStr:
    """The API key from the argument, else the first of ``env_vars`` that is set.

    Raises:
        AuthError: no key anywhere (the message names the variables to set).
    """
    import os

    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    if not api_key:
        api_key = next((os.environ[v] for v in env_vars if os.environ.get(v)), None)
    if not api_key:
        raise AuthError(
            f"no {provider} API key: set {' or '.join(env_vars)} or pass api_key=...",
            provider=provider,
        )
    return SecretStr(api_key)


def client_or_error(
    provider: str, api_key: str | SecretStr | None, env_vars: Sequence[str], **options: Any
) -> tuple[ApiClient | None, AuthError | None]:
    """The provider's :class:`ApiClient` when a key is found (argument, else ``env_vars``);
    else the AuthError for the provider to raise on first use, since building a provider
    must not need a key. ``options`` go to ``ApiClient``."""
    try:
        key = resolve_key(provider, api_key, env_vars)
    except AuthError as exc:
        return None, exc
    hint = f"Check {env_vars[0]}" + (f" (or {env_vars[1]})." if len(env_vars) > 1 else ".")
    return ApiClient(provider=provider, api_key=key, key_hint=hint, **options), None


class ApiClient:
    """JSON over HTTP with one error mapping (see the module docstring).

    Args:
        provider: the provider's name, for messages.
        base_url: prefix of every path.
        api_key: sent as ``Authorization: Bearer``; never logged nor put in a message.
        client: the ``httpx.Client`` to use (a new one when None).
        error_message: reads the provider's error text out of a failed response's JSON.
        capacity_markers: substrings (of the message or error code) that mean "no capacity".
        max_attempts: tries per request, first one included.
        backoff_s / max_backoff_s: base and cap of the exponential backoff.
        key_hint: how to fix a rejected key, appended to AuthError messages.
    """

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        api_key: SecretStr,
        client: httpx.Client | None = None,
        error_message: Callable[[Any], str] | None = None,
        capacity_markers: Sequence[str] = (),
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 30.0,
        key_hint: str = "",
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self._client = client or httpx.Client(timeout=timeout_s)
        self._error_message = error_message or _default_message
        self.capacity_markers = tuple(capacity_markers)
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self.key_hint = key_hint

    def __repr__(self) -> str:
        return f"ApiClient(provider={self.provider!r}, base_url={self.base_url!r})"

    @property
    def key(self) -> SecretStr:
        """The API key it sends (a ``SecretStr``: never printed)."""
        return self._key

    def request(self, method: str, path: str, *, json: Any = None, idempotent: bool = True) -> Any:
        """Send one request; return the parsed JSON body of a 2xx reply (None when empty).

        Raises:
            AuthError, CapacityError, RateLimitError, ProviderAPIError.
        """
        url = f"{self.base_url}{path}"
        what = f"{self.provider} {method} {path}"
        headers = {"Authorization": f"Bearer {self._key.get_secret_value()}"}
        last: ProviderError | None = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                resp = self._client.request(
                    method, url, json=json, headers=headers, timeout=self.timeout_s
                )
            except httpx.ConnectError as exc:
                # Nothing reached the server: safe to retry even a create.
                last = ProviderAPIError(f"{what}: cannot connect ({exc})", provider=self.provider)
                last.__cause__ = exc
                self._sleep(attempt, None)
                continue
            except httpx.TransportError as exc:
                last = ProviderAPIError(
                    f"{what}: {type(exc).__name__} (no reply)", provider=self.provider
                )
                if not idempotent:
                    raise last from exc
                last.__cause__ = exc
                self._sleep(attempt, None)
                continue
            status = resp.status_code
            if 200 <= status < 300:
                try:
                    return resp.json() if resp.content else None
                except ValueError as exc:
                    raise ProviderAPIError(
                        f"{what}: HTTP {status} with a body that is not JSON: {resp.text[:200]!r}",
                        provider=self.provider,
                    ) from exc
            message = self._message(resp)
            if status in (401, 403):
                hint = f" {self.key_hint}" if self.key_hint else ""
                raise AuthError(
                    f"{self.provider} rejected the API key (HTTP {status}: {message}).{hint}",
                    provider=self.provider,
                )
            if status == 429:
                last = RateLimitError(
                    f"{what}: rate limited (HTTP 429) {self.max_attempts} times: {message}",
                    provider=self.provider,
                )
                self._sleep(attempt, _retry_after(resp))
                continue
            if status >= 500 and not self.is_capacity(message):
                last = ProviderAPIError(
                    f"{what}: HTTP {status}: {message}", provider=self.provider, status=status
                )
                if not idempotent:
                    raise last
                self._sleep(attempt, _retry_after(resp))
                continue
            raise self.error_for(message, status=status, what=what)
        assert last is not None
        raise last

    def is_capacity(self, message: str) -> bool:
        low = message.lower()
        return any(m.lower() in low for m in self.capacity_markers)

    def error_for(self, message: str, *, status: int | None, what: str) -> ProviderError:
        """The error for a refusal the provider explained with ``message``."""
        if self.is_capacity(message):
            return CapacityError(message, provider=self.provider, status=status)
        where = f"HTTP {status}: " if status else ""
        return ProviderAPIError(f"{what}: {where}{message}", provider=self.provider, status=status)

    def _message(self, resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            return resp.text[:300].strip() or resp.reason_phrase
        text = self._error_message(body)
        return text or resp.text[:300]

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        if attempt >= self.max_attempts:
            return
        if retry_after is not None:
            delay = min(retry_after, self.max_backoff_s * 4)
        else:
            # Full jitter: uniform in [0, base * 2^n], capped.
            delay = random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
        log.debug("%s: retrying in %.2fs (attempt %d)", self.provider, delay, attempt)
        time.sleep(delay)

    def close(self) -> None:
        self._client.close()


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _default_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return " ".join(str(err.get(k, "")) for k in ("code", "message") if err.get(k))
        if isinstance(err, str):
            return err
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message", ""))
        for k in ("message", "detail"):
            if body.get(k):
                return str(body[k])
    return ""
