"""The agent's watchdog: a deadline, the client's heartbeat, and the instance's own termination.

Inputs, all from the client: ``LORABURST_DEADLINE`` (unix time) and
``LORABURST_DEADLINE_REASON`` (the cap behind it: ``budget`` or ``max_runtime``) and
``LORABURST_HEARTBEAT_GRACE_S`` in the environment; ``WORKDIR/heartbeat`` (its mtime is the
client's last sign of life); ``WORKDIR/control.json`` with ``{"stop": reason}``,
``{"deadline": t}`` (replaces the env deadline) or ``{"hold_until": t}`` (the client could not
store the adapter and keeps the instance for ``loraburst attach``: no self-termination before
``t``, so the only copy of the adapter is not destroyed while the user frees space).

Decisions (:meth:`Watchdog.decide`, a pure function of those inputs and the clock):

====================================  ==================================================
situation                             what happens
====================================  ==================================================
stop requested in control.json        training stops: checkpoint, partial adapter
deadline passed                       training stops ("deadline"); once saved, the
                                      instance is terminated after ``pull_window_s``
client gone (heartbeat older than     with a way to terminate: training goes on (the
grace), training running              client may re-attach); without: it stops
                                      ("client_gone")
client gone, training ended           the instance is terminated
held (before ``hold_until``)          nothing is terminated, whatever the heartbeat or
                                      deadline say; after it, the rows above apply
====================================  ==================================================

Termination is one HTTP request the client's provider described (``SelfTermination`` in
:mod:`loraburst.providers`), handed over in the environment: ``LORABURST_TERMINATE_URL``,
``LORABURST_TERMINATE_BODY``, the bearer token itself (``LORABURST_TERMINATE_TOKEN``) or the
name of a variable the instance already holds it in (``LORABURST_TERMINATE_TOKEN_ENV``), and
whether a 200 answer may still carry GraphQL ``errors``. The watchdog knows no provider.
``urllib`` only: this runs before the trainer's dependencies are known to exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from .protocol import (
    CONTROL_FILE,
    ENV_DEADLINE,
    ENV_DEADLINE_REASON,
    ENV_HEARTBEAT_GRACE,
    HEARTBEAT_FILE,
    append_event,
)

__all__ = [
    "ENV_TERMINATE_BODY",
    "ENV_TERMINATE_GRAPHQL",
    "ENV_TERMINATE_TOKEN",
    "ENV_TERMINATE_TOKEN_ENV",
    "ENV_TERMINATE_URL",
    "Decision",
    "SelfTerminator",
    "TerminateError",
    "Watchdog",
]

ENV_TERMINATE_URL = "LORABURST_TERMINATE_URL"
ENV_TERMINATE_BODY = "LORABURST_TERMINATE_BODY"
ENV_TERMINATE_TOKEN = "LORABURST_TERMINATE_TOKEN"
ENV_TERMINATE_TOKEN_ENV = "LORABURST_TERMINATE_TOKEN_ENV"
ENV_TERMINATE_GRAPHQL = "LORABURST_TERMINATE_GRAPHQL"


class TerminateError(RuntimeError):
    """The provider refused or failed the terminate call (the message never holds the key)."""


@dataclasses.dataclass(frozen=True)
class SelfTerminator:
    """One POST that terminates this instance, as the client's provider described it."""

    url: str
    body: bytes
    key: str = dataclasses.field(repr=False)
    graphql: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SelfTerminator | None:
        """The request from ``LORABURST_TERMINATE_*``; None when the client gave none (or the
        variable that should hold the token is empty)."""
        url, body = env.get(ENV_TERMINATE_URL), env.get(ENV_TERMINATE_BODY)
        if not url or body is None:
            return None
        key = env.get(ENV_TERMINATE_TOKEN) or env.get(env.get(ENV_TERMINATE_TOKEN_ENV) or "", "")
        if not key:
            return None
        return cls(url, body.encode(), key, env.get(ENV_TERMINATE_GRAPHQL) == "1")

    def __call__(self, timeout: float = 30.0) -> None:
        """Send the terminate call.

        Raises:
            TerminateError: a transport error, a non-2xx answer, or GraphQL ``errors``.
        """
        request = urllib.request.Request(
            self.url,
            data=self.body,
            method="POST",
            headers={
                "Authorization": f"Bearer {self.key}",
                "Content-Type": "application/json",
                "User-Agent": "loraburst-agent",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise TerminateError(self._redact(f"terminate: HTTP {exc.code}: {detail}")) from None
        except (urllib.error.URLError, OSError) as exc:
            raise TerminateError(self._redact(f"terminate: {exc}")) from None
        if self.graphql:
            try:
                errors = json.loads(text).get("errors")
            except (json.JSONDecodeError, AttributeError):
                errors = f"unreadable answer {text[:200]!r}"
            if errors:
                raise TerminateError(self._redact(f"terminate failed: {errors}"))

    def _redact(self, message: str) -> str:
        return message.replace(self.key, "***") if self.key else message


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the watchdog wants now: stop training (with a reason) and/or terminate."""

    stop: str | None = None
    terminate: bool = False
    client_gone: bool = False


class Watchdog:
    """Watches the deadline, the heartbeat and control.json; see the module docstring.

    Args:
        workdir: The run's work directory.
        env: Where ``LORABURST_*``/provider settings are read (default ``os.environ``).
        poll_s: Seconds between checks in the background thread.
        pull_window_s: After the deadline, how long the saved adapter waits for the client
            before the instance is terminated.
        clock: Unix time source.
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        *,
        poll_s: float = 1.0,
        pull_window_s: float = 45.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        env = os.environ if env is None else env
        self.workdir = Path(workdir)
        self.deadline = float(env[ENV_DEADLINE]) if env.get(ENV_DEADLINE) else None
        # Which cap set the deadline ("budget", "max_runtime"): the stop says so.
        self.deadline_reason = env.get(ENV_DEADLINE_REASON) or "deadline"
        self.grace = float(env[ENV_HEARTBEAT_GRACE]) if env.get(ENV_HEARTBEAT_GRACE) else None
        self.terminator = SelfTerminator.from_env(env)
        self.poll_s = poll_s
        self.pull_window_s = pull_window_s
        self.clock = clock
        self.started_at = clock()
        self.training_ended = False
        self.terminated = False
        self.hold_until: float | None = None
        self._stop: str | None = None
        self._said_gone = False
        self._failures = 0
        self._retry_at = 0.0
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # -- decisions --------------------------------------------------------------------------
    @property
    def stop_reason(self) -> str | None:
        """Why training should stop, or None; the first reason sticks."""
        return self._stop

    def request_stop(self, reason: str) -> None:
        """Ask the trainer to checkpoint, save the partial adapter and stop."""
        if self._stop is None:
            self._stop = reason
            append_event(self.workdir, "stop_requested", reason=reason)

    def heartbeat_age(self, now: float) -> float:
        """Seconds since the client's last touch (since the agent started, if it never did)."""
        try:
            last = (self.workdir / HEARTBEAT_FILE).stat().st_mtime
        except OSError:
            last = self.started_at
        return now - max(last, self.started_at)

    def _read_control(self) -> str | None:
        """Apply a new deadline; return a stop reason written after this agent started."""
        path = self.workdir / CONTROL_FILE
        try:
            mtime = path.stat().st_mtime
            control = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # absent, or caught mid-write: read it again next time
        if not isinstance(control, dict):
            return None
        if isinstance(control.get("deadline"), (int, float)):
            self.deadline = float(control["deadline"])
            reason = control.get("deadline_reason")
            self.deadline_reason = str(reason) if isinstance(reason, str) else "deadline"
        hold = control.get("hold_until")
        self.hold_until = float(hold) if isinstance(hold, (int, float)) else None
        # A stop left over from an earlier agent (the client restarted us) is not for us.
        stop = control.get("stop")
        return str(stop) if stop and mtime >= self.started_at else None

    def decide(self, now: float | None = None) -> Decision:
        """What should happen now, given control.json, the deadline and the heartbeat."""
        now = self.clock() if now is None else now
        stop = self._read_control()
        past_deadline = self.deadline is not None and now >= self.deadline
        gone = self.grace is not None and self.heartbeat_age(now) > self.grace
        if stop is None and past_deadline:
            stop = self.deadline_reason
        if stop is None and gone and self.terminator is None:
            stop = "client_gone"
        held = self.hold_until is not None and now < self.hold_until
        terminate = (
            self.terminator is not None
            and self.training_ended
            and not self.terminated
            and not held
            and (gone or (past_deadline and now >= (self.deadline or 0.0) + self.pull_window_s))
        )
        return Decision(stop=stop, terminate=terminate, client_gone=gone)

    # -- actions ----------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> Decision:
        """Decide, then act: record a stop request, terminate the instance when due."""
        now = self.clock() if now is None else now
        decision = self.decide(now)
        if decision.client_gone and not self._said_gone:
            self._said_gone = True
            append_event(self.workdir, "client_gone", grace_s=self.grace)
        elif not decision.client_gone and self._said_gone:
            self._said_gone = False
            append_event(self.workdir, "client_back")
        if decision.stop is not None:
            self.request_stop(decision.stop)
        if decision.terminate and self.terminator is not None and now >= self._retry_at:
            try:
                self.terminator()
            except TerminateError as exc:
                # Keep trying, with backoff: a leaked instance bills until someone notices.
                self._failures += 1
                self._retry_at = now + min(60.0, 2.0**self._failures)
                append_event(self.workdir, "self_terminate_failed", error=str(exc))
            else:
                self.terminated = True
                append_event(self.workdir, "self_terminated")
        return decision

    def start(self) -> None:
        """Check every ``poll_s`` seconds in a daemon thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._halt.wait(self.poll_s):
            self.tick()

    def close(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def linger(self) -> None:
        """After training ended: keep watching while there is an instance to terminate.

        Returns at once where there is nothing to watch for (no terminate path, or no grace and
        no deadline), else when the instance has been terminated (which normally kills us).
        """
        self.training_ended = True
        if self.terminator is None or (self.grace is None and self.deadline is None):
            return
        while not self.terminated:
            self.tick()
            time.sleep(self.poll_s)
