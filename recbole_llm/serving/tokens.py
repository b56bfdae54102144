"""What callers pass as item tokens and histories: valid Unicode, a token, an ordered sequence.

Checked by the runtime (histories), the catalogue (new items) and the service (request bodies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def valid_unicode(text: str) -> bool:
    """Valid Unicode: no lone UTF-16 surrogate (from a JSON escape or a bad decode)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_token(token: Any) -> bool:
    """A string, or an integer short enough to have a decimal form (Python refuses str() past 4,300 digits)."""
    return type(token) is str or (
        isinstance(token, (str, int, np.integer)) and not isinstance(token, (bool, np.bool_))
        and (isinstance(token, str) or abs(int(token)) < 10**100))


def is_sequence(value: Any, ndim: int = 1) -> bool:
    """A list, tuple or ``ndim``-D array: ordered, and not a string, bytes or mapping."""
    if isinstance(value, np.ndarray):
        return value.ndim == ndim
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, Mapping))
