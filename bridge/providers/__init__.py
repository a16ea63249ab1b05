"""The provider registry: provider name -> the module that speaks its API.

Adding a provider is one module with a `PROVIDER` object that satisfies
`bridge.providers.base.Provider`, one line here, and its tests.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.providers.base import Provider

_REGISTRY = {
    "lemft": "bridge.providers.lemft",
    "lunpay": "bridge.providers.lunpay",
    "kasushou": "bridge.providers.kasushou",
}


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


@functools.cache  # asked for every callback and every query
def get(name: str) -> Provider:
    """The provider called `name`; KeyError when there is none."""
    module = importlib.import_module(_REGISTRY[name])
    provider: Provider = module.PROVIDER
    return provider
