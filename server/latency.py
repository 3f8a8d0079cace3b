"""Latency marks of a spoken answer (the paper's Table 4 rows) and their avg / p50 / p90."""

from __future__ import annotations

import numpy as np

LATENCY_ROWS = (  # (key, label): the paper's Table 4 steps
    ("text", "state-1 decision -> first text segment"),
    ("prefill", "first text segment -> speech-decoder prefill"),
    ("tokens", "prefill -> first speech-token window"),
    ("pcm", "first speech-token window -> first PCM"),
    ("total", "state-1 decision -> first PCM"),
)


def percentiles(values: list[float]) -> dict:
    """{"n", "avg", "p50", "p90"} of `values` ({"n": 0} when there are none)."""
    if not values:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"n": len(v), "avg": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}
