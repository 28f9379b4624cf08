"""URLs as messages show them: errors, logs and the pull-request report end up in CI output."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# user[:password]@ after the scheme, and query values, for text urlsplit cannot parse.
_USERINFO = re.compile(r"(?<=://)([^/@\s]*)@")
_QUERY_VALUE = re.compile(r"([?&][^=&#\s]+=)[^&#\s]+")


def redact(text: str, url: str) -> str:
    """`text` with the credentials and query values of `url` shown as ***.

    A password is hidden, and so is a user name given without one (a token such as
    `https://ghp_...@github.com/...`); signed URLs carry their token in the query.
    """
    if "://" not in url:
        return text
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:  # too broken to parse: hide by pattern
        return _QUERY_VALUE.sub(r"\1***", _USERINFO.sub("***@", text))
    if password:
        text = text.replace(f":{password}@", ":***@")
    elif user:
        text = text.replace(f"://{user}@", "://***@")
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if value:
            text = text.replace(pair, f"{key}=***")
    return text
