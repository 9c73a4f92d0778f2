"""Providers: the plugin-author API and the registry.

Providers are found through the entry-point group ``loraburst.providers``; loraburst's own
(``local``, ``ssh``, ``runpod``, ``lambda``) are registered in its pyproject exactly the way a
third-party package registers one::

    [project.entry-points."loraburst.providers"]
    mycloud = "mycloud_loraburst:MyCloudProvider"
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any

from loraburst._exceptions import ConfigError

from ._base import (
    Capabilities,
    Feature,
    Host,
    LaunchRequest,
    Machine,
    MachineStatus,
    Offer,
    Provider,
    SelfTermination,
    SSHEndpoint,
)

__all__ = [
    "Capabilities",
    "Feature",
    "Host",
    "LaunchRequest",
    "Machine",
    "MachineStatus",
    "Offer",
    "Provider",
    "SSHEndpoint",
    "SelfTermination",
    "available_providers",
    "get_provider",
    "provider_class",
]

GROUP = "loraburst.providers"


def available_providers() -> list[str]:
    """Names of every installed provider plugin, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def get_provider(name: str, **kwargs: Any) -> Provider:
    """Instantiate the provider registered as ``name`` (imported only now, lazily).

    Raises:
        ConfigError: no provider has that name (the message lists the installed ones), or its
            optional dependencies are missing (the message says what to install).
    """
    provider: Provider = provider_class(name)(**kwargs)
    return provider


def provider_class(name: str) -> type[Provider]:
    """The class registered as ``name``, imported now: its declared ``capabilities`` say what
    it needs and does before any object is built.

    Raises:
        ConfigError: as :func:`get_provider`.
    """
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        names = available_providers()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown provider {name!r}.{hint} Installed providers: {', '.join(names) or 'none'}."
        )
    try:
        cls = matches[0].load()
    except ImportError as exc:
        raise ConfigError(
            f"provider {name!r} could not be imported ({exc}); install its dependencies, "
            f"e.g. `pip install 'loraburst[{name}]'` or the plugin's package."
        ) from exc
    return cls  # type: ignore[no-any-return]
