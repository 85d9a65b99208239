"""A small asynchronous ACME (RFC 8555) client, in two layers.

``transport.py`` talks RFC 8555 over HTTP: the session, the directory, the nonce pool, JWS
signing, ``badNonce`` and ``Retry-After`` retries, problem documents and polling.
``client.py`` is the order flow on top of it: account, order, authorizations, finalize,
download, revocation and renewal information.

Why not certbot's ``acme.client.ClientV2``: it is synchronous, sleeps a fixed second between
polls (which alone makes first contact take seconds), retries ``badNonce`` only once, cannot
send an order's ``replaces`` (RFC 9773) and has no tls-alpn-01. Against a fast CA the polling
cadence decides the latency of a first handshake, so this client polls from tens of
milliseconds upwards and honours ``Retry-After`` instead. The wire format still comes from
``acme.messages`` and ``josepy``; only transport, retries and the order flow are ours.
"""

from .client import AcmeClient, ChallengeResponder, IssuedCertificate, RenewalInfo
from .transport import parse_retry_after, problem_error

__all__ = ["AcmeClient", "ChallengeResponder", "IssuedCertificate", "RenewalInfo", "parse_retry_after", "problem_error"]
