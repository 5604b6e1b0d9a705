"""Bucketing of the batch dimension M for tuned-config keys.

Raw M would make every new batch size a new key (and a new tuning run); powers of two up to 4096 cover decode
(1–16), speculative verification (16–128) and prefill chunks (≥ 256) with 13 keys.
"""
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def m_bucket(m: int) -> int:
    """Smallest bucket ≥ m (4096 for anything larger)."""
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]
