"""No API key or private key reaches a log, an exception or a repr (checked by grepping)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from loraburst._exceptions import LoraburstError
from loraburst.providers import LaunchRequest, Offer, _keys
from loraburst.providers._http import ApiClient, resolve_key
from loraburst.providers.lambdalabs import LambdaProvider
from loraburst.providers.runpod import RunPodProvider

from tests.fakes.lambdalabs import LambdaFake
from tests.fakes.runpod import RunPodFake
from tests.providers._launch import launched


def _private_key_body(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line for line in lines if line and not line.startswith("-----")]


def _errors_text(fn: object) -> str:
    try:
        fn()  # type: ignore[operator]
    except LoraburstError as exc:
        chain = []
        e: BaseException | None = exc
        while e is not None:
            chain.append(f"{type(e).__name__}: {e} {e!r}")
            e = e.__cause__ or e.__context__
        return "\n".join(chain)
    return ""


def test_runpod_flow_leaks_no_secret(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    offer = Offer("runpod", "RTX 4090", 1, 24, 0.69, "NVIDIA GeForce RTX 4090")
    run = launched(runpod_provider, offer, "sec")
    machine, host, key_path = run.machine, run.host, run.key_path
    assert machine is not None and host is not None and key_path is not None
    host.start_agent({"HF_TOKEN": "hf_supersecret123"})  # no bundle: the agent fails, fine
    key_body = _private_key_body(key_path)  # read now: teardown deletes the job's key
    host.close()
    texts = [caplog.text, repr(runpod_provider), repr(machine)]
    runpod_fake.faults.unauthorized = True
    texts.append(_errors_text(runpod_provider.offers))
    runpod_fake.faults.unauthorized = False
    runpod_fake.faults.server_error = 100
    texts.append(_errors_text(runpod_provider.offers))
    runpod_fake.faults.server_error = 0
    run.teardown()
    texts.append(caplog.text)
    secrets = [runpod_fake.api_key, "hf_supersecret123", *key_body]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert "HTTP 401" in texts[3] and "HTTP 500" in texts[4]  # the texts were real errors


def test_lambda_errors_leak_no_key(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lambda_fake.faults.capacity = True
    _, public = _keys.generate_key("lb-sec-2")
    offer = Offer("lambda", "A10", 1, 24, 0.75, "gpu_1x_a10", region="us-east-1")
    text = _errors_text(lambda: lambda_provider.launch(LaunchRequest("lb-sec-2", offer, public)))
    assert "Not enough capacity" in text
    bad = LambdaProvider("wrong-key-value", base_url=f"{lambda_fake.url}/api/v1")
    text += _errors_text(bad.offers)
    assert "invalid-api-key" in text
    for secret in (lambda_fake.api_key, "wrong-key-value"):
        assert secret not in text + caplog.text + repr(lambda_provider)


def test_api_client_repr_and_key_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDA_API_KEY", "env-secret-1")
    key = resolve_key("lambda", None, ["LORABURST_LAMBDA_API_KEY", "LAMBDA_API_KEY"])
    assert "env-secret-1" not in repr(key) and key.get_secret_value() == "env-secret-1"
    api = ApiClient(provider="x", base_url="http://127.0.0.1:9", api_key=key, client=httpx.Client())
    assert "env-secret-1" not in repr(api)
    api.max_attempts = 1
    text = _errors_text(lambda: api.request("GET", "/"))
    assert "cannot connect" in text and "env-secret-1" not in text


def test_secrets_reach_the_agent_through_stdin_never_a_command_line(tmp_path: Path) -> None:
    """A command line is world-readable on the instance (/proc/<pid>/cmdline); the AWS secret
    used to be one (``bash -c '... env AWS_SECRET_ACCESS_KEY=...'``)."""
    import json
    import secrets
    import time

    from loraburst.providers.ssh import SSHProvider

    from tests.fakes.sshd import SSHD, ed25519_key
    from tests.providers.test_transport import _bundle

    key = tmp_path / "client_key"
    sshd = SSHD(tmp_path / "host", ed25519_key(key), audit=True)
    sshd.start()
    token, aws = "tok-" + secrets.token_hex(12), "aws/" + secrets.token_hex(16) + "'$x"
    try:
        provider = SSHProvider(f"root@{sshd.host}:{sshd.port}", key_path=key, connect_timeout_s=10)
        machine = provider.launch(LaunchRequest("lb-s-1", provider.offers()[0], ""))
        host = provider.connect(machine, None, f"{machine.workdir_root}/runs/s")
        bundle, sha = _bundle(tmp_path)
        host.upload_bundle(bundle, sha)
        host.start_agent({"SECRET_TOKEN": token, "AWS_SECRET_ACCESS_KEY": aws, "AGENT_SLEEP": "3"})
        deadline = time.time() + 10
        while host.read_text("state.json") is None and time.time() < deadline:
            time.sleep(0.1)
        state = json.loads(host.read_text("state.json") or "{}")
        pid = int(host.read_text("agent.pid") or "0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        host.close()
    finally:
        sshd.stop()
    assert state["token_len"] == len(token)  # the agent did get it
    commands = sshd.commands_log.read_text()
    assert "loraburst.remote.agent" in commands  # the audit saw the start command itself
    assert token not in commands and aws not in commands
    assert "loraburst.remote.agent" in cmdline and token not in cmdline and aws not in cmdline
    assert not (sshd.root / "runs" / "s" / "agent.env").exists()  # read once, then deleted
