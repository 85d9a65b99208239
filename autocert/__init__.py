"""autocert: automatic HTTPS for many domains, with certificates from any ACME CA.

The public API is what ``__all__`` lists; the modules behind it may change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from ._errors import AcmeError, AutocertError, ConfigError, InvalidName, IssuanceError, StoreError

if TYPE_CHECKING:
    from ._manager import Manager

__all__ = [
    "AcmeError",
    "AutocertError",
    "ConfigError",
    "InvalidName",
    "IssuanceError",
    "Manager",
    "StoreError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the CLI imports this package for every command, and `serve`
    # binds its ports before the database and TLS stack (about a second of imports) load.
    if name == "Manager":
        from ._manager import Manager

        return Manager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
