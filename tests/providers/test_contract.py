"""Every built-in provider passes the provider contract: the remote ones against their
emulators or a real sshd, local on this machine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from loraburst.providers.lambdalabs import LambdaProvider
from loraburst.providers.local import LocalProvider
from loraburst.providers.runpod import RunPodProvider
from loraburst.providers.ssh import SSHProvider
from loraburst.testing import ProviderContract

from tests.fakes.fixtures import SSHDHost
from tests.fakes.lambdalabs import LambdaFake
from tests.fakes.runpod import RunPodFake


class TestRunPodContract(ProviderContract):
    @pytest.fixture
    def provider(self, runpod_provider: RunPodProvider) -> RunPodProvider:
        return runpod_provider

    @pytest.fixture
    def bad_key_provider(self, runpod_fake: RunPodFake) -> RunPodProvider:
        return RunPodProvider("wrong-key", base_url=runpod_fake.url)

    @pytest.fixture
    def exhaust_capacity(self, runpod_fake: RunPodFake) -> Callable[[], None]:
        return lambda: setattr(runpod_fake.faults, "capacity", True)


class TestLambdaContract(ProviderContract):
    @pytest.fixture
    def provider(self, lambda_provider: LambdaProvider) -> LambdaProvider:
        return lambda_provider

    @pytest.fixture
    def bad_key_provider(self, lambda_fake: LambdaFake) -> LambdaProvider:
        return LambdaProvider("wrong-key", base_url=f"{lambda_fake.url}/api/v1")

    @pytest.fixture
    def exhaust_capacity(self, lambda_fake: LambdaFake) -> Callable[[], None]:
        return lambda: setattr(lambda_fake.faults, "capacity", True)


class TestSSHContract(ProviderContract):
    @pytest.fixture
    def provider(self, sshd_host: SSHDHost) -> SSHProvider:
        return SSHProvider(sshd_host.target, key_path=sshd_host.key_path, connect_timeout_s=10)


class TestLocalContract(ProviderContract):
    @pytest.fixture
    def provider(self) -> LocalProvider:
        return LocalProvider()
