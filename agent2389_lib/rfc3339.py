"""RFC 3339 date-times with a zone, as the wire carries them (`expires_at`, a cooldown's `until`),
read here: Python 3.9's fromisoformat takes neither `Z` nor every fraction of a second."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Optional

_RFC3339_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?"
                         r"(?:[Zz]|([+-])(\d{2}):(\d{2}))\Z")


def parse_rfc3339(value: Any) -> Optional[float]:
    """Unix time of an RFC 3339 date and time with a zone (`Z` or an offset); None for anything else."""
    match = _RFC3339_RE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.group(1, 2, 3, 4, 5, 6))
    sign, offset_hours, offset_minutes = match.group(8, 9, 10)
    offset = (int(offset_hours) * 3600 + int(offset_minutes) * 60) * (-1 if sign == "-" else 1) if sign else 0
    try:
        moment = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=timezone.utc)
    except ValueError:  # no such day or time
        return None
    return moment.timestamp() + float(match.group(7) or 0) - offset
