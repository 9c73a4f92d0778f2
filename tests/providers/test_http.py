"""The request helper against a real local server: retries, backoff, what is never retried."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import pytest
from loraburst._exceptions import AuthError, CapacityError, ProviderAPIError
from loraburst.providers._http import ApiClient
from pydantic import SecretStr

from tests.fakes._server import JsonServer, Reply, json_reply


class Script:
    """Answers requests from a list of replies (the last one repeats); counts them."""

    def __init__(self) -> None:
        self.replies: list[Reply] = [json_reply(200, {"ok": True})]
        self.delay_s = 0.0
        self.count = 0

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        self.count += 1
        time.sleep(self.delay_s)
        return self.replies[min(self.count - 1, len(self.replies) - 1)]


@pytest.fixture
def served() -> Iterator[tuple[Script, ApiClient]]:
    script = Script()
    server = JsonServer(script)
    url = server.start()
    api = ApiClient(
        provider="demo",
        base_url=url,
        api_key=SecretStr("k"),
        capacity_markers=("sold out",),
        max_attempts=3,
        backoff_s=0.01,
        timeout_s=0.5,
    )
    try:
        yield script, api
    finally:
        api.close()
        server.stop()


def test_retry_after_as_http_date(served: tuple[Script, ApiClient]) -> None:
    script, api = served
    when = email.utils.formatdate(time.time() + 1.2, usegmt=True)
    script.replies = [json_reply(429, {}, {"Retry-After": when}), json_reply(200, {"n": 1})]
    t0 = time.monotonic()
    assert api.request("GET", "/x") == {"n": 1}
    assert time.monotonic() - t0 >= 0.2  # HTTP dates have 1 s resolution


def test_create_is_not_retried_after_a_500(served: tuple[Script, ApiClient]) -> None:
    script, api = served
    script.replies = [json_reply(500, {"message": "boom"})]
    with pytest.raises(ProviderAPIError, match="HTTP 500: boom"):
        api.request("POST", "/create", json={}, idempotent=False)
    assert script.count == 1
    with pytest.raises(ProviderAPIError):
        api.request("GET", "/read")
    assert script.count == 1 + 3


def test_timeouts_are_retried_then_reported(served: tuple[Script, ApiClient]) -> None:
    script, api = served
    script.delay_s = 0.8
    with pytest.raises(ProviderAPIError, match="ReadTimeout"):
        api.request("GET", "/slow")
    assert script.count == 3


def test_status_mapping(served: tuple[Script, ApiClient]) -> None:
    script, api = served
    script.replies = [json_reply(403, {"error": {"code": "global/account-inactive"}})]
    with pytest.raises(AuthError, match="account-inactive"):
        api.request("GET", "/")
    script.count, script.replies = 0, [json_reply(400, {"message": "GPU sold out, sorry"})]
    with pytest.raises(CapacityError, match="^GPU sold out, sorry$"):
        api.request("GET", "/")
    script.count, script.replies = 0, [json_reply(404, {"detail": "nope"})]
    with pytest.raises(ProviderAPIError, match="HTTP 404: nope"):
        api.request("GET", "/")
    assert script.count == 1
