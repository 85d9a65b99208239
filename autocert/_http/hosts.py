"""Whether a request came on the right connection: the host it names against the TLS name.

A TLS connection is made for one name, but nothing stops a client from asking it for
another: browsers reuse connections across names that share a certificate or an address,
and a hostile client does it on purpose, to reach an upstream virtual host through a
certificate made for someone else. Such a request gets ``421 Misdirected Request`` (RFC 9110
section 15.5.20), which tells a browser to try again on a connection of its own.
"""

from __future__ import annotations

import re
from typing import Final

from .._names import authority_host
from .heads import error_body

#: The page a misdirected request gets, with status 421.
MISDIRECTED_PAGE: Final = error_body(421, "This connection was made for another host name. Please connect again for this one.")

#: The authority of an absolute-form target (``https://shop.example:8443/path``).
_ABSOLUTE: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


def misdirected(host: bytes | None, target: bytes, name: str) -> bool:
    """Whether a request with ``Host: host`` for ``target`` names a host other than ``name``.

    An absolute-form target names its host itself and the ``Host`` header is ignored (RFC 9112
    section 3.2.2). A request without either (HTTP/1.0 may omit ``Host``) names nothing else.
    The caller tries the cheap case first (the same bytes as the last host that matched).
    """
    if not target.startswith(b"/") and target != b"*":
        absolute = _ABSOLUTE.match(target)
        if absolute is None:
            return True
        host = absolute.group(1)
    elif host is None:
        return False
    try:
        text = host.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return authority_host(text) != name
