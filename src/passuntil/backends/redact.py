"""Credentials out of every line passuntil prints or stores.

`redact(text)` replaces what looks like a credential with `***`: the token of an
`Authorization: Bearer|Basic ...` header, `sk-...`-like API keys, the value of `api_key=`,
`token=`, `x-api-key:` and the like (query strings, JSON, headers), the `user:pass@` of a URL,
and the values of the environment variables that usually hold keys (`OPENAI_API_KEY`, `HF_TOKEN`,
...) plus any `secrets=` the caller names (the openai backend passes the value of its
`api_key_env`). Servers echo requests in their error bodies (a 401 that repeats the
`Authorization` header), so every error line of a remote backend and every URL kept with a run
goes through here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

MASK = "***"
# Environment variables whose values are redacted wherever they appear.
KEY_ENV_VARS = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_API_KEY",
                "VLLM_API_KEY", "AZURE_OPENAI_API_KEY")
MIN_SECRET_LEN = 4  # shorter values are not worth masking (they would mask ordinary text)

_PATTERNS = (
    # Authorization: Bearer <token> / Basic <b64> (header, JSON, repr of a dict)
    (re.compile(r"(?i)\b(bearer|basic)(\s+|%20)[^\s\"',;}\]]+"), rf"\1\2{MASK}"),
    # sk-..., sk-proj-..., hf_..., key-like tokens
    (re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-]{6,}"), rf"\1-{MASK}"),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), f"hf_{MASK}"),
    # key=value, "key": "value", key: value for credential-named keys
    (re.compile(r"(?i)([\"']?\b(?:x-)?(?:api[_-]?key|access[_-]?token|auth[_-]?token|token|secret|"
                r"password|passwd|authorization)[\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;}\]]+)"),
     rf"\1{MASK}"),
    # scheme://user:pass@host or scheme://token@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@\"']+@"), rf"\1{MASK}@"),
)


def redact(text: str, *, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every credential it contains replaced by `***`."""
    values = [os.environ.get(v) for v in KEY_ENV_VARS] + list(secrets)
    # longest first, so a secret that contains another is masked whole
    for value in sorted({v for v in values if v and len(v) >= MIN_SECRET_LEN}, key=len,
                        reverse=True):
        text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text
