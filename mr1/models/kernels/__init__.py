"""Attention kernels behind ``ModelConfig.attention_impl``.

:data:`DECODE_ATTENTION` maps each implementation name to a function with one contract
(:mod:`mr1.models.kernels.decode_attention`): the attention of a few query rows per (row, kv
head) against one key segment under a validity mask, returning the segment's normalised output
and its log-sum-exp, so that segments (shared prompt prefix, per-row cache, the token's own key)
merge into one softmax with :func:`merge_segments`.
"""

from mr1.models.kernels.decode_attention import (
    DECODE_ATTENTION,
    decode_attention_pallas,
    decode_attention_xla,
    merge_segments,
    register_decode_attention,
)

__all__ = ["DECODE_ATTENTION", "decode_attention_pallas", "decode_attention_xla",
           "merge_segments", "register_decode_attention"]
