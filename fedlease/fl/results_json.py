"""The JSON of a run's results (``metrics.jsonl``, ``summary.json``, ``compare.json``), which any
JSON parser reads: a number that is not finite (the score of a client whose evaluation never
arrived, the mean of a round that was not evaluated) is written as ``null``, never as the
``NaN`` that Python's ``json`` writes by default and strict parsers refuse. ``score`` reads such
a number back as NaN, which ``np.nanmean`` skips.
"""

from __future__ import annotations

import json
import math


def finite_or_null(obj):
    """``obj`` with every float that is not finite replaced by None (dicts, lists and tuples
    walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``obj`` with non-finite floats as null (it refuses any left)."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def score(value) -> float:
    """A score as the results files hold it: null (not reported) is NaN."""
    return math.nan if value is None else float(value)
