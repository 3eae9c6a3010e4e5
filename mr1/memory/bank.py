"""The memory bank: fixed-shape slot tensors, pure jittable ops, retrieval and prompt rendering.

A bank holds ``S`` slots; slot ``i``'s *memory id* is ``i`` and stays ``i`` across UPDATEs.
Everything is a fixed-shape array, so banks ``vmap`` (a batch of banks is a bank whose leaves
carry a leading axis), shard along that axis and live inside jitted rollouts::

  tokens      [S, L] int32    memory text token ids, right-padded with ``pad_id``
  lengths     [S]    int32    number of real tokens (0 for free slots)
  valid       [S]    bool     slot holds a memory
  embeddings  [S, D] float32  L2-normalised embedding of the memory text (0 for free slots)
  speaker     [S]    int32    owner of the memory (-1 for free slots)
  created     [S]    int32    step at which the memory was added (-1 for free slots)
  updated     [S]    int32    step of the last ADD/UPDATE (-1 for free slots)
  step        []     int32    number of actions applied so far (every action counts, NOOPs too)

and two static (non-pytree) settings, fixed when the bank is made: ``pad_id`` and
``full_policy``.

Ops (:class:`OpCode`) are applied from a :class:`MemoryAction` pytree by masked scatters; no
Python branch ever looks at a traced value. :func:`apply_action` applies one action, and
:func:`apply_actions` a sequence ``[N]`` of them in order (``lax.scan``).

* ``ADD``: write into the first free slot (lowest index). When the bank is full the
  ``full_policy`` (a key of :data:`FULL_POLICIES`) decides: ``"refuse"`` refuses the op,
  ``"evict_lru"`` overwrites the least-recently-updated memory, ``"evict_fifo"`` (alias
  ``"evict_oldest"``) the least-recently-created one (ties: lowest index). The result names
  the evicted slot, so a caller can count every eviction (nothing is dropped silently).
* ``UPDATE``: rewrite the text/embedding of a valid ``target`` slot; keeps its id, speaker and
  ``created``, sets ``updated``.
* ``DELETE``: clear a valid ``target`` slot (tokens to ``pad_id``, all fields to their
  free-slot values), so equal histories give bit-identical banks.
* ``NOOP``: nothing but the step counter.

An ADD/UPDATE whose ``length`` exceeds ``max_len`` keeps the first ``max_len`` tokens and is
reported ``truncated`` (:func:`make_action` keeps the untruncated length for this).
An ADD/UPDATE with ``length == 0``, an UPDATE/DELETE whose target is out of range or free, and
an unknown op code are refused; the bank is then unchanged except for ``step``. The reason is
reported as a :class:`Refusal` code in :class:`OpResult`.
"""

from __future__ import annotations

import enum
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NORM_EPS = 1e-12


class OpCode(enum.IntEnum):
    """Memory operations; the integer is what an action's ``op`` field holds."""

    NOOP = 0
    ADD = 1
    UPDATE = 2
    DELETE = 3


class Refusal(enum.IntEnum):
    """Why an op was refused (``OK``: it was applied)."""

    OK = 0
    BANK_FULL = 1       # ADD on a full bank under the "refuse" policy
    BAD_TARGET = 2      # UPDATE/DELETE target out of range or not a valid slot
    EMPTY_TEXT = 3      # ADD/UPDATE with length 0
    UNKNOWN_OP = 4      # op code outside OpCode


@flax.struct.dataclass
class MemoryBank:
    """A bank of ``S`` memory slots (shapes in the module docstring)."""

    tokens: Array
    lengths: Array
    valid: Array
    embeddings: Array
    speaker: Array
    created: Array
    updated: Array
    step: Array
    pad_id: int = flax.struct.field(pytree_node=False, default=0)
    full_policy: str = flax.struct.field(pytree_node=False, default="refuse")

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[-2]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[-1]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[-1]


@flax.struct.dataclass
class MemoryAction:
    """One op, or a batch of them when every leaf has leading axes.

    op        []     int32    an :class:`OpCode`
    target    []     int32    slot id for UPDATE/DELETE (ignored by ADD/NOOP)
    tokens    [L]    int32    new memory text, right-padded (ADD/UPDATE)
    length    []     int32    number of real tokens in ``tokens``
    embedding [D]    float32  embedding of the new text (normalised on write)
    speaker   []     int32    owner recorded by ADD
    """

    op: Array
    target: Array
    tokens: Array
    length: Array
    embedding: Array
    speaker: Array


@flax.struct.dataclass
class OpResult:
    """What applying an action did (leading axes follow the action's).

    applied  [] bool   the op changed the bank (False for NOOP and for refused ops)
    refused  [] bool   the op was refused (``reason != OK``)
    reason   [] int32  a :class:`Refusal`
    slot     [] int32  slot written or cleared, -1 if none
    evicted  [] int32  slot whose memory was evicted by ADD on a full bank, -1 if none
    truncated [] bool  an applied ADD/UPDATE kept only ``max_len`` of its ``length`` tokens
    """

    applied: Array
    refused: Array
    reason: Array
    slot: Array
    evicted: Array
    truncated: Array


def empty_bank(num_slots: int, max_len: int, dim: int, pad_id: int = 0,
               full_policy: str = "refuse") -> MemoryBank:
    """A bank with every slot free; ``full_policy`` is a key of :data:`FULL_POLICIES`."""
    if full_policy not in FULL_POLICIES:
        raise KeyError(f"unknown full_policy {full_policy!r}; known: {sorted(FULL_POLICIES)}")
    s = num_slots
    return MemoryBank(
        tokens=jnp.full((s, max_len), pad_id, jnp.int32),
        lengths=jnp.zeros((s,), jnp.int32),
        valid=jnp.zeros((s,), bool),
        embeddings=jnp.zeros((s, dim), jnp.float32),
        speaker=jnp.full((s,), -1, jnp.int32),
        created=jnp.full((s,), -1, jnp.int32),
        updated=jnp.full((s,), -1, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        pad_id=int(pad_id),
        full_policy=full_policy,
    )


def make_action(op: int | Array, target: int | Array = -1, tokens: Sequence[int] | Array = (),
                embedding: Sequence[float] | Array | None = None, speaker: int | Array = 0, *,
                max_len: int, dim: int, pad_id: int = 0,
                length: int | Array | None = None) -> MemoryAction:
    """Builds one action on the host, padding/truncating ``tokens`` to ``max_len``.

    ``length`` defaults to the *untruncated* token count, so the bank can report an over-long
    text as ``truncated`` (it stores ``min(length, max_len)`` tokens).
    """
    toks = np.full((max_len,), pad_id, np.int32)
    arr = np.asarray(tokens, np.int32).reshape(-1)
    full = arr.size
    arr = arr[:max_len]
    toks[: arr.size] = arr
    emb = np.zeros((dim,), np.float32) if embedding is None else np.asarray(embedding, np.float32)
    return MemoryAction(
        op=jnp.asarray(op, jnp.int32), target=jnp.asarray(target, jnp.int32),
        tokens=jnp.asarray(toks), length=jnp.asarray(full if length is None else length,
                                                     jnp.int32),
        embedding=jnp.asarray(emb), speaker=jnp.asarray(speaker, jnp.int32))


def stack_actions(actions: Sequence[MemoryAction]) -> MemoryAction:
    """Stacks single actions into a batched action ``[N, ...]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *actions)


def normalize(x: Array, axis: int = -1) -> Array:
    """L2-normalises along ``axis``; zero vectors stay zero."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, NORM_EPS)


# ----------------------------------------------------------------------------- full policies
# A policy gives each valid slot an eviction priority (lower: evicted first; int32 >= 0), or is
# None to refuse ADDs on a full bank. ADD then takes the first minimum of
# ``where(valid, priority, -1)``: the first free slot when there is one, the policy's victim
# otherwise -- one reduction for both.

FULL_POLICIES: dict[str, Callable[[MemoryBank], Array] | None] = {
    "refuse": None,
    "evict_lru": lambda bank: bank.updated,       # least recently ADDed/UPDATEd
    "evict_fifo": lambda bank: bank.created,      # least recently ADDed (first in, first out)
    "evict_oldest": lambda bank: bank.created,    # alias of evict_fifo (older configs)
}


def _first_min(key: Array) -> Array:
    """Index of the first minimum of ``key [S]`` (int32).

    Two plain ``min`` reductions: XLA vectorises them, unlike the variadic reduce behind
    ``jnp.argmin`` (several times slower inside a vmapped scan on CPU).
    """
    slots = jnp.arange(key.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(key == jnp.min(key), slots, key.shape[-1]))


# ----------------------------------------------------------------------------- applying ops

def _write_row(field: Array, slot: Array, new: Array, do: Array) -> Array:
    """Masked scatter of one row: ``field[slot] = new`` if ``do``, else nothing.

    The mask sends the index out of bounds and the scatter drops it, so the old row is never
    gathered (cheaper than ``where(do, new, field[slot])`` inside vmapped scans).
    """
    return field.at[jnp.where(do, slot, field.shape[0])].set(new, mode="drop")


def apply_action(bank: MemoryBank, action: MemoryAction) -> tuple[MemoryBank, OpResult]:
    """Applies one action (unbatched leaves) to one bank. Pure and jittable.

    Uses the bank's static ``full_policy`` and ``pad_id``. Returns the new bank and an
    :class:`OpResult`.
    """
    full_policy, pad_id = bank.full_policy, bank.pad_id
    s = bank.num_slots
    op, target = action.op, action.target
    is_add, is_upd, is_del = op == OpCode.ADD, op == OpCode.UPDATE, op == OpCode.DELETE
    known = (op >= 0) & (op < len(OpCode))

    # ADD: first free slot, else the policy's victim (see FULL_POLICIES).
    priority_fn = FULL_POLICIES[full_policy]
    may_evict = priority_fn is not None
    priority = jnp.zeros((s,), jnp.int32) if priority_fn is None else priority_fn(bank)
    add_slot = _first_min(jnp.where(bank.valid, priority, -1))
    has_free = ~bank.valid[add_slot]

    in_range = (target >= 0) & (target < s)
    tgt = jnp.clip(target, 0, s - 1).astype(jnp.int32)
    target_ok = in_range & bank.valid[tgt]
    has_text = action.length > 0

    reason = jnp.select(
        [~known,
         (is_add | is_upd) & ~has_text,
         is_add & ~has_free & (not may_evict),
         (is_upd | is_del) & ~target_ok],
        [Refusal.UNKNOWN_OP, Refusal.EMPTY_TEXT, Refusal.BANK_FULL, Refusal.BAD_TARGET],
        Refusal.OK).astype(jnp.int32)
    ok = reason == Refusal.OK
    do_add, do_upd, do_del = ok & is_add, ok & is_upd, ok & is_del
    write = do_add | do_upd
    slot = jnp.where(is_add, add_slot, tgt)
    touched = write | do_del
    evicted = jnp.where(do_add & ~has_free, add_slot, -1).astype(jnp.int32)

    L = bank.max_len
    length = jnp.clip(action.length, 0, L).astype(jnp.int32)
    pos = jnp.arange(L)
    new_tokens = jnp.where(pos < length, action.tokens.astype(jnp.int32), pad_id)
    new_tokens = jnp.where(do_del, pad_id, new_tokens)
    new_emb = jnp.where(do_del, 0.0, normalize(action.embedding.astype(jnp.float32)))
    cur = bank.step
    new_speaker = jnp.select([do_add, do_del], [action.speaker, -1], bank.speaker[slot])
    new_created = jnp.select([do_add, do_del], [cur, -1], bank.created[slot])

    bank = bank.replace(
        tokens=_write_row(bank.tokens, slot, new_tokens, touched),
        lengths=_write_row(bank.lengths, slot, jnp.where(do_del, 0, length), touched),
        valid=_write_row(bank.valid, slot, ~do_del, touched),
        embeddings=_write_row(bank.embeddings, slot, new_emb, touched),
        speaker=_write_row(bank.speaker, slot, new_speaker.astype(jnp.int32), touched),
        created=_write_row(bank.created, slot, new_created.astype(jnp.int32), touched),
        updated=_write_row(bank.updated, slot, jnp.where(do_del, -1, cur).astype(jnp.int32),
                           touched),
        step=cur + 1,
    )
    result = OpResult(applied=touched, refused=~ok, reason=reason,
                      slot=jnp.where(touched, slot, -1).astype(jnp.int32), evicted=evicted,
                      truncated=write & (action.length > L))
    return bank, result


def apply_actions(bank: MemoryBank, actions: MemoryAction) -> tuple[MemoryBank, OpResult]:
    """Applies a sequence of actions (leaves ``[N, ...]``) in order; results are ``[N]``."""
    return jax.lax.scan(apply_action, bank, actions)


def apply_actions_batched(banks: MemoryBank, actions: MemoryAction
                          ) -> tuple[MemoryBank, OpResult]:
    """Applies ``actions [B, N, ...]`` to ``banks [B, ...]``: bank ``b`` gets ``actions[b]`` in order.

    Same result as ``vmap(apply_actions)``, but scans over ``N`` outside the ``vmap`` over
    ``B``, which XLA:CPU runs faster. Results are ``[B, N]``.
    """
    step = jax.vmap(apply_action)
    time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), actions)
    banks, results = jax.lax.scan(step, banks, time_major)
    return banks, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), results)


# ----------------------------------------------------------------------------- retrieval

@flax.struct.dataclass
class Retrieved:
    """Top-k retrieval result (leading axes follow the query's).

    indices [k] int32    slot ids, best first; -1 where ``mask`` is False
    scores  [k] float32  cosine similarity; 0 where ``mask`` is False
    mask    [k] bool     the entry is a real memory (False when fewer than k match)
    """

    indices: Array
    scores: Array
    mask: Array


def retrieve(bank: MemoryBank, query_embedding: Array, k: int,
             speaker: int | Array | None = None) -> Retrieved:
    """Top-``k`` valid slots by cosine similarity with ``query_embedding [D]``.

    Stored embeddings are unit-norm, so the cosine is a dot product with the normalised query.
    ``speaker`` (None: any) restricts to memories of that speaker. ``k`` is static; when fewer
    than ``k`` slots qualify (or ``k > S``) the tail is masked. Ties go to the lower slot id.
    """
    r = retrieve_many(bank, query_embedding[None], k,
                      None if speaker is None else jnp.reshape(speaker, (1,)))
    return jax.tree.map(lambda x: x[0], r)


def retrieve_many(bank: MemoryBank, queries: Array, k: int,
                  speaker: Array | None = None) -> Retrieved:
    """:func:`retrieve` for ``queries [Q, D]`` (``speaker [Q]`` or None) -> leaves ``[Q, k]``.

    One ``[S, D] x [D, Q]`` matmul per bank (the ``[S, Q]`` product layout is the faster one
    on XLA:CPU), then ``top_k`` per query.
    """
    s = bank.num_slots
    q = normalize(queries.astype(jnp.float32))
    scores = (bank.embeddings @ q.T).T                                    # [Q, S]
    eligible = jnp.broadcast_to(bank.valid, scores.shape)
    if speaker is not None:
        eligible = eligible & (bank.speaker[None, :] == jnp.asarray(speaker)[:, None])
    keyed = jnp.where(eligible, scores, -jnp.inf)
    kk = min(k, s)
    top, idx = jax.lax.top_k(keyed, kk)
    mask = jnp.take_along_axis(eligible, idx, axis=1)
    if kk < k:
        pad = ((0, 0), (0, k - kk))
        top, idx, mask = jnp.pad(top, pad), jnp.pad(idx, pad), jnp.pad(mask, pad)
    return Retrieved(indices=jnp.where(mask, idx, -1).astype(jnp.int32),
                     scores=jnp.where(mask, top, 0.0).astype(jnp.float32), mask=mask)


# ----------------------------------------------------------------------------- rendering

@flax.struct.dataclass
class RenderTemplate:
    """Pre-tokenised pieces for rendering memories as ``"[id] text\\n"`` lines inside jit.

    prefix         [M, P] int32  tokens of the prefix for display id ``m`` (e.g. ``"[m] "``)
    prefix_lengths [M]    int32
    suffix         [Q]    int32  tokens after each memory (e.g. ``"\\n"``)
    suffix_length  []     int32
    """

    prefix: Array
    prefix_lengths: Array
    suffix: Array
    suffix_length: Array


def make_render_template(tokenize: Callable[[str], Sequence[int]], num_ids: int,
                         prefix_format: str = "[{id}] ", suffix: str = "\n",
                         pad_id: int = 0) -> RenderTemplate:
    """Tokenises the id prefixes ``0..num_ids-1`` and the suffix once, on the host.

    ``tokenize`` maps a string to token ids without special tokens (for a HF tokenizer:
    ``lambda s: tok.encode(s, add_special_tokens=False)``). Memory texts are stored tokenised
    on their own, so ``prefix + text + suffix`` is packed without re-tokenising the line.
    """
    pre = [list(tokenize(prefix_format.format(id=i))) for i in range(num_ids)]
    suf = list(tokenize(suffix))
    p = max(1, max(len(x) for x in pre))
    prefix = np.full((num_ids, p), pad_id, np.int32)
    for i, x in enumerate(pre):
        prefix[i, : len(x)] = x
    suffix_arr = np.full((max(1, len(suf)),), pad_id, np.int32)
    suffix_arr[: len(suf)] = suf
    return RenderTemplate(prefix=jnp.asarray(prefix),
                          prefix_lengths=jnp.asarray([len(x) for x in pre], jnp.int32),
                          suffix=jnp.asarray(suffix_arr),
                          suffix_length=jnp.asarray(len(suf), jnp.int32))


@flax.struct.dataclass
class Rendered:
    """A packed, left-padded prompt segment.

    tokens [T] int32  ``pad_id`` then the concatenated lines
    mask   [T] bool   real tokens
    length []  int32  number of real tokens
    count  []  int32  number of memories rendered
    """

    tokens: Array
    mask: Array
    length: Array
    count: Array


def render(bank: MemoryBank, indices: Array, mask: Array, template: RenderTemplate,
           display_ids: Array | None = None, max_tokens: int | None = None) -> Rendered:
    """Packs the selected memories into one left-padded token segment, inside jit.

    Line ``i`` (for ``mask[i]``) is ``prefix[display_ids[i]] + tokens[indices[i]] + suffix``;
    ``display_ids`` defaults to the slot ids (must be ``< M``, clipped otherwise). Lines are
    packed in order without gaps and the segment is left-padded to ``T = max_tokens`` (static;
    default: the worst case ``k * (P + L + Q)``). Lines that would overflow ``T`` are dropped
    whole, from the end. Padding uses the bank's ``pad_id``.
    """
    pad_id = bank.pad_id
    k = indices.shape[0]
    P, L, Q = template.prefix.shape[1], bank.max_len, template.suffix.shape[0]
    T = k * (P + L + Q) if max_tokens is None else max_tokens
    m = template.prefix.shape[0]
    slot = jnp.clip(indices, 0, bank.num_slots - 1)
    did = jnp.clip(slot if display_ids is None else display_ids, 0, m - 1)
    plen = template.prefix_lengths[did]
    tlen = bank.lengths[slot]
    seg = jnp.where(mask, plen + tlen + template.suffix_length, 0)
    fits = jnp.cumsum(seg) <= T
    seg = jnp.where(fits, seg, 0)
    ends = jnp.cumsum(seg)
    starts = ends - seg
    total = ends[-1]

    j = jnp.arange(T)
    p = j - (T - total)                         # position within the packed lines
    line = jnp.clip(jnp.searchsorted(ends, p, side="right"), 0, k - 1)
    w = p - starts[line]                        # position within the line
    pl, tl = plen[line], tlen[line]
    from_prefix = template.prefix[did[line], jnp.clip(w, 0, P - 1)]
    from_text = bank.tokens[slot[line], jnp.clip(w - pl, 0, L - 1)]
    from_suffix = template.suffix[jnp.clip(w - pl - tl, 0, Q - 1)]
    tok = jnp.select([w < pl, w < pl + tl], [from_prefix, from_text], from_suffix)
    real = p >= 0
    return Rendered(tokens=jnp.where(real, tok, pad_id).astype(jnp.int32), mask=real,
                    length=total.astype(jnp.int32),
                    count=jnp.sum(mask & fits).astype(jnp.int32))
