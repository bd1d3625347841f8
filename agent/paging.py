"""Page tokens (AIP-158): opaque to callers, they hold where the last page
ended and the filter of the listing they belong to, so that a token is never
used with another filter."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .errors import InvalidArgument


def encode(listing_filter: str, after: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps([listing_filter, *after]).encode()).decode()


def decode(token: str, listing_filter: str, count: int) -> list[Any]:
    """What `encode` was given as `after` (`count` items); INVALID_ARGUMENT for a token not made for this filter."""
    try:
        filt, *after = json.loads(base64.urlsafe_b64decode(token.encode()))
        if len(after) != count:
            raise ValueError(f"{len(after)} items")
    except (ValueError, TypeError, binascii.Error) as err:
        raise InvalidArgument("page_token is not one this agent gave out", reason="INVALID_PAGE_TOKEN",
                              field="page_token") from err
    if filt != listing_filter:
        raise InvalidArgument("page_token belongs to a listing with another filter; start again without it",
                              reason="INVALID_PAGE_TOKEN", field="page_token")
    return list(after)
