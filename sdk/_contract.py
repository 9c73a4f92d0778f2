"""The provider contract suite (``loraburst.testing.ProviderContract``): every provider's tests subclass it.

A subclass supplies fixtures; the suite checks the verbs the runner relies on::

    from loraburst.testing import ProviderContract

    class TestMyCloud(ProviderContract):
        @pytest.fixture
        def provider(self, my_fake):
            return MyCloudProvider(api_key=my_fake.api_key, base_url=my_fake.url)

        @pytest.fixture
        def bad_key_provider(self, my_fake):  # optional: enables the auth test
            return MyCloudProvider(api_key="wrong", base_url=my_fake.url)

        @pytest.fixture
        def exhaust_capacity(self, my_fake):  # optional: enables the capacity test
            return lambda: setattr(my_fake, "sold_out", True)

The ``offer`` fixture defaults to the provider's first available offer.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loraburst.providers import Capabilities, LaunchRequest, Machine, Offer, Provider

from ._exceptions import AuthError, CapacityError, ConfigError

__all__ = ["ProviderContract"]


class ProviderContract:
    """Contract tests for a ``Provider`` (see the module docstring for the fixtures)."""

    #: How long a launched machine may take to become ready and answer over SSH.
    ready_timeout_s: float = 60.0
    poll_s: float = 0.2

    # -- fixtures a subclass provides or overrides -------------------------------------------
    @pytest.fixture
    def provider(self) -> Provider:
        raise NotImplementedError("a ProviderContract subclass must define a `provider` fixture")

    @pytest.fixture
    def offer(self, provider: Provider) -> Offer:
        offers = [o for o in provider.offers() if o.available]
        if not offers:
            pytest.skip(f"{provider.name} has no available offer to launch")
        return offers[0]

    @pytest.fixture
    def bad_key_provider(self) -> Provider | None:
        return None

    @pytest.fixture
    def exhaust_capacity(self) -> Callable[[], None] | None:
        return None

    # -- helpers ----------------------------------------------------------------------------
    def request(self, provider: Provider, offer: Offer) -> tuple[LaunchRequest, Path | None]:
        """A launch request with a fresh tag and per-job key (as the runner makes them)."""
        from loraburst.providers import _keys

        tag = f"lb-contract{secrets.token_hex(3)}-1"
        key_path, public = _keys.generate_key(tag)
        return LaunchRequest(tag=tag, offer=offer, public_key=public), key_path

    def wait_ready(self, provider: Provider, machine: Machine) -> Machine:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            current = provider.get(machine.id)
            assert current is not None, f"{provider.name} lost {machine.id} while it booted"
            assert current.status not in ("terminated", "preempted"), current
            if current.ready(provider.capabilities):
                return current
            assert time.monotonic() < deadline, f"not ready after {self.ready_timeout_s}s"
            time.sleep(self.poll_s)

    @staticmethod
    def assert_gone(provider: Provider, machine_id: str) -> None:
        current = provider.get(machine_id)
        assert current is None or current.status in ("terminated", "preempted"), (
            f"{provider.name} still reports {machine_id} as {current.status}"
        )

    # -- the contract -----------------------------------------------------------------------
    def test_offers_are_well_formed(self, provider: Provider) -> None:
        for o in provider.offers():
            assert o.provider == provider.name
            assert o.gpu and o.instance_type
            assert o.price_per_hour >= 0 and o.billing_increment_s >= 1 and o.gpu_count >= 0

    def test_capabilities_are_declared(self, provider: Provider, offer: Offer) -> None:
        """What the runner reads instead of the provider's name: declared, and consistent."""
        caps = provider.capabilities
        assert isinstance(caps, Capabilities) and caps.gpu_counts
        assert offer.gpu_count in caps.gpu_counts
        if caps.same_machine:
            assert not caps.installs_packages, "never pip-install into the user's own machine"
        if not caps.self_terminates:
            machine = Machine(provider=provider.name, id="x", tag="lb-x", status="running")
            assert provider.self_termination(machine) is None

    def test_configuration_is_declared(
        self, provider: Provider, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """What ``provider="auto"`` and ``cleanup`` read: declared on the class, and true."""
        declared = getattr(type(provider), "capabilities", None)
        assert isinstance(declared, Capabilities), "declare `capabilities` on the class"
        caps = provider.capabilities
        assert (caps.credentials, caps.needs_credentials, caps.billed) == (
            declared.credentials,
            declared.needs_credentials,
            declared.billed,
        ), "an object may refine its capabilities, not what configures or bills it"
        for var in caps.credentials:
            assert var.isidentifier() and var == var.upper(), f"{var!r} is not an env variable"
        assert caps.needs_credentials or not caps.credentials
        assert caps.needs_credentials or not caps.billed, "renting needs an account"
        if not caps.credentials:
            return
        # With none of its variables set and nothing given, it says which to set, before any
        # request (when it is built, or on first use).
        for var in caps.credentials:
            monkeypatch.delenv(var, raising=False)
        with pytest.raises((AuthError, ConfigError)) as info:
            try:
                bare = type(provider)()
            except TypeError:
                pytest.skip(f"{provider.name} cannot be built without arguments")
            bare.offers()
        assert any(var in str(info.value) for var in caps.credentials), (
            f"the error names a variable to set: {info.value}"
        )

    def test_unsupported_features_have_reasons(self, provider: Provider) -> None:
        for feature, reason in provider.unsupported.items():
            assert isinstance(reason, str) and reason.strip(), feature

    def test_launch_get_connect_terminate(self, provider: Provider, offer: Offer) -> None:
        request, key_path = self.request(provider, offer)
        machine = provider.launch(request)
        try:
            assert machine.tag == request.tag
            found = provider.find(request.tag)
            assert found is not None and found.id == machine.id
            assert machine.id in {m.id for m in provider.list_tagged("lb-contract")}
            ready = self.wait_ready(provider, machine)
            host = provider.connect(ready, key_path, f"{ready.workdir_root}/runs/contract")
            try:
                rc, out, _ = host.run("echo ok", timeout=30)
                assert (rc, out.strip()) == (0, "ok")
                host.write_text("probe.txt", "contract")
                assert host.read_text("probe.txt") == "contract"
                assert host.read_text("missing.txt") is None
            finally:
                host.close()
        finally:
            provider.terminate(machine.id)
        _eventually(lambda: self.assert_gone(provider, machine.id))

    def test_terminate_is_idempotent(self, provider: Provider, offer: Offer) -> None:
        request, _ = self.request(provider, offer)
        machine = provider.launch(request)
        provider.terminate(machine.id)
        provider.terminate(machine.id)
        _eventually(lambda: self.assert_gone(provider, machine.id))
        provider.terminate(machine.id)

    def test_capacity_error(
        self,
        provider: Provider,
        offer: Offer,
        exhaust_capacity: Callable[[], None] | None,
    ) -> None:
        if exhaust_capacity is None:
            pytest.skip(f"{provider.name} cannot run out of capacity")
        exhaust_capacity()
        request, _ = self.request(provider, offer)
        with pytest.raises(CapacityError) as info:
            provider.launch(request)
        assert str(info.value).strip(), "a capacity error must carry the provider's message"
        assert provider.find(request.tag) is None

    def test_auth_error(self, bad_key_provider: Provider | None, offer: Offer) -> None:
        if bad_key_provider is None:
            pytest.skip("this provider has no API key to reject")
        with pytest.raises(AuthError):
            bad_key_provider.offers()
        request, _ = self.request(bad_key_provider, offer)
        with pytest.raises(AuthError):
            bad_key_provider.launch(request)


def _eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
