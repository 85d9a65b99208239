"""autocert: automatic HTTPS for many domains, with certificates from any ACME CA.

The public API is what ``__all__`` lists; the modules behind it may change.
"""

from __future__ import annotations

from ._version import __version__
from .errors import AcmeError, AutocertError, ConfigError, InvalidName, IssuanceError, StoreError
from .manager import Manager

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
