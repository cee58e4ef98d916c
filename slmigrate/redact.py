"""Credentials out of URLs before they are shown: health, metrics, start-up lines, log and error messages, --json.

Upstream and store URLs may carry a secret in the user-info part (``https://user:pass@host``,
``postgresql://slm:pw@db/calls``, ``https://TOKEN@host``) or in a query parameter (``?api_key=...``,
``&sig=...``). Everything slmigrate prints goes through ``redact_url`` (one URL) or ``redact_urls`` (free text
that may contain URLs, e.g. an exception message). The whole user-info is masked, not only the password, because
a user-info without a password is often a token.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters whose value is a credential: API keys, tokens, signatures (Azure SAS "sig"), passwords.
_SECRET_PARAM = re.compile(r"key|token|secret|passw|pwd|auth|sig|credential", re.IGNORECASE)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with its user-info and secret-looking query values replaced by ``***``; other text unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 host: fall back to masking anything before an "@"
        return re.sub(r"(://)[^/@]*@", rf"\1{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(name) for name, _ in pairs):
            query = urlencode([(name, MASK if _SECRET_PARAM.search(name) else value) for name, value in pairs],
                              safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_urls(text: str) -> str:
    """Every URL inside ``text`` passed through ``redact_url`` (for exception and log messages)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)
