"""The SUBLLM KV cache (docs/design.md §3.7).

Blocks inside a segment cache only the tokens their segment kept, per row; slot validity
is tracked once per nesting level, since every block of a level sees the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class LayerKV:
    """Keys and values one block has cached, in a buffer that grows by doubling.

    Slot validity is tracked per nesting level (LevelState), not here: every block of a
    level sees the same tokens.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        if self.k is None or self.k.shape[2] < end:
            cap = max(end, 2 * (self.k.shape[2] if self.k is not None else 0), 64)
            new_k = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_zeros(v.shape[0], v.shape[1], cap, v.shape[3])
            if self.k is not None:
                new_k[:, :, :start] = self.k[:, :, :start]
                new_v[:, :, :start] = self.v[:, :, :start]
            self.k, self.v = new_k, new_v
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self, length: int) -> int:
        if self.k is None:
            return 0
        return 2 * self.k[:, :, :length].numel() * self.k.element_size()


class ScoreHistory:
    """The scores one subsampling module gave the tokens entering it and whether it kept
    them, slot by slot in its parent level's cache (validity: that level's `LevelState`):
    the rank rule ranks each new token against the scores, its band counts the kept ones
    (design.md §3.8). Grows by doubling, like `LayerKV`."""

    def __init__(self) -> None:
        self.scores: Tensor | None = None  # (B, capacity)
        self.kept: Tensor | None = None  # (B, capacity) bool

    def update(self, scores: Tensor, kept: Tensor, start: int) -> None:
        end = start + scores.shape[1]
        if self.scores is None or self.scores.shape[1] < end:
            cap = max(end, 2 * (self.scores.shape[1] if self.scores is not None else 0), 64)
            self.scores = _grown(self.scores, scores.new_zeros(scores.shape[0], cap), start)
            self.kept = _grown(self.kept, kept.new_zeros(kept.shape[0], cap), start)
        self.scores[:, start:end] = scores
        self.kept[:, start:end] = kept

    def past(self, start: int) -> tuple[Tensor | None, Tensor | None]:
        """The scores and decisions of the first `start` slots (None, None before any)."""
        if self.scores is None or start == 0:
            return None, None
        return self.scores[:, :start], self.kept[:, :start]


# --------------------------------------------------------------------------------------
# KV cache (design.md §3.7)
# --------------------------------------------------------------------------------------


class LevelState:
    """Which KV slots hold real tokens, for all blocks of one nesting level."""

    def __init__(self) -> None:
        self.valid: Tensor | None = None  # (B, capacity) bool
        self.pos: Tensor | None = None  # (B, capacity) positions (the sliding window's)
        self.length = 0
        self.all_valid = True  # every slot so far was appended as real for every row

    def append(self, valid: Tensor | None, batch: int, n: int, device: torch.device,
               pos: Tensor | None = None) -> tuple[int, Tensor, Tensor | None]:
        """Reserve slots for n new tokens (valid: (B, n) or None = all real) at positions
        `pos` (B, n), recorded when given.

        Returns (start slot, validity of the slots before it, their positions or None).
        """
        if valid is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=device)
        else:  # without reading `valid` back from the device: no host sync
            self.all_valid = False
        start = self.length
        end = start + n
        if self.valid is None or self.valid.shape[1] < end:
            cap = max(end, 2 * (self.valid.shape[1] if self.valid is not None else 0), 64)
            self.valid = _grown(self.valid, valid.new_zeros(valid.shape[0], cap), start)
            if self.pos is not None:
                self.pos = _grown(self.pos, self.pos.new_zeros(self.pos.shape[0], cap), start)
        if pos is not None and self.pos is None:
            self.pos = pos.new_zeros(pos.shape[0], self.valid.shape[1])
        past = self.valid[:, :start]
        past_pos = self.pos[:, :start] if pos is not None else None
        self.valid[:, start:end] = valid
        if pos is not None:
            self.pos[:, start:end] = pos
        self.length = end
        return start, past, past_pos


def _grown(old: Tensor | None, new: Tensor, keep: int) -> Tensor:
    if old is not None:
        new[:, :keep] = old[:, :keep]
    return new


@dataclass
class KVCache:
    """Per-block keys/values, per-level slot validity, each subsampling module's scores
    (the rank rule) and each row's next position.

    Blocks inside a segment only cache the tokens their segment kept; a token no row kept
    adds nothing to them.
    """

    layers: list[LayerKV]
    levels: list[LevelState]
    next_pos: Tensor | None = None  # (B,)
    scores: list[ScoreHistory] = field(default_factory=list)  # per subsampling module
    # the level of each block, and the level each subsampling module reads from (its
    # parent's): what `select` and `stack` need to keep every buffer's slots aligned
    block_levels: list[int] | None = None
    score_levels: list[int] | None = None

    @classmethod
    def empty(cls, n_layers: int, n_levels: int, block_levels: list[int] | None = None,
              score_levels: list[int] | None = None) -> KVCache:
        """n_levels: 1 + the number of subsampling modules (one level inside each)."""
        return cls([LayerKV() for _ in range(n_layers)], [LevelState() for _ in range(n_levels)],
                   scores=[ScoreHistory() for _ in range(n_levels - 1)],
                   block_levels=block_levels, score_levels=score_levels)

    @property
    def seen(self) -> int:
        """Tokens (columns, padding included) that went into the cache."""
        return self.levels[0].length

    def level_lengths(self) -> list[int]:
        return [lv.length for lv in self.levels]

    @torch.no_grad()
    def reorder(self, rows: Tensor) -> None:
        """Keep/duplicate batch rows in the order `rows` (beam search)."""
        for kv in self.layers:
            if kv.k is not None:
                kv.k, kv.v = kv.k.index_select(0, rows), kv.v.index_select(0, rows)
        for lv in self.levels:
            if lv.valid is not None:
                lv.valid = lv.valid.index_select(0, rows.to(lv.valid.device))
            if lv.pos is not None:
                lv.pos = lv.pos.index_select(0, rows.to(lv.pos.device))
        for h in self.scores:
            if h.scores is not None:
                h.scores = h.scores.index_select(0, rows.to(h.scores.device))
                h.kept = h.kept.index_select(0, rows.to(h.kept.device))
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, rows.to(self.next_pos.device))

    def nbytes(self, block_levels: list[int]) -> int:
        """Bytes of keys and values actually held (not buffer capacity)."""
        return sum(
            kv.nbytes(self.levels[lvl].length)
            for kv, lvl in zip(self.layers, block_levels, strict=True)
        )


    # ---- continuous batching (subllm serve): rows leave and join between decoding steps --
    # A row's slots need not be contiguous nor aligned with other rows': attention, the rank
    # rule and its band read a row's cached slots through their validity only, and positions
    # are per row (`next_pos`, `LevelState.pos`). So rows can be stacked with empty slots
    # padding the shorter levels, and slots no row holds can be dropped.

    def _slot_buffers(self) -> dict[tuple[str, int], tuple[Tensor, int, int]]:
        """{(kind, index): (tensor, its slot dimension, its level)} of every buffer indexed
        by slot: keys and values, the rank rule's scores and decisions, validity, positions."""
        if self.block_levels is None or self.score_levels is None:
            raise ValueError("this KVCache has no level map; make it with model.new_cache()")
        out = {}
        for i, (kv, lvl) in enumerate(zip(self.layers, self.block_levels, strict=True)):
            if kv.k is not None:
                out["k", i], out["v", i] = (kv.k, 2, lvl), (kv.v, 2, lvl)
        for i, (h, lvl) in enumerate(zip(self.scores, self.score_levels, strict=True)):
            if h.scores is not None:
                out["scores", i], out["kept", i] = (h.scores, 1, lvl), (h.kept, 1, lvl)
        for lvl, state in enumerate(self.levels):
            if state.valid is not None:
                out["valid", lvl] = (state.valid, 1, lvl)
            if state.pos is not None:
                out["pos", lvl] = (state.pos, 1, lvl)
        return out

    def _set_slot_buffer(self, key: tuple[str, int], t: Tensor) -> None:
        kind, i = key
        owner = {"k": self.layers, "v": self.layers, "scores": self.scores,
                 "kept": self.scores, "valid": self.levels, "pos": self.levels}[kind][i]
        setattr(owner, kind, t)

    def _refresh_levels(self, lengths: list[int]) -> None:
        for state, n in zip(self.levels, lengths, strict=True):
            state.length = n
            state.all_valid = state.valid is None or bool(state.valid[:, :n].all())

    @torch.no_grad()
    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (in that order) and drop the slots none of them
        holds, so that a finished request frees its memory."""
        lengths = [state.length for state in self.levels]
        held = []
        for state, n in zip(self.levels, lengths, strict=True):
            if state.valid is None:
                held.append(None)
                continue
            rows_valid = state.valid[:, :n].index_select(0, rows.to(state.valid.device))
            held.append(rows_valid.any(0).nonzero().squeeze(1))
        for key, (t, dim, lvl) in self._slot_buffers().items():
            picked = t.narrow(dim, 0, lengths[lvl]).index_select(0, rows.to(t.device))
            self._set_slot_buffer(key, picked.index_select(dim, held[lvl].to(t.device)))
        self._refresh_levels([n if h is None else len(h)
                              for n, h in zip(lengths, held, strict=True)])
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, rows.to(self.next_pos.device))

    @classmethod
    @torch.no_grad()
    def stack(cls, a: KVCache, b: KVCache) -> KVCache:
        """One cache holding a's rows then b's (two caches of one model, each after a
        forward pass), each level as long as the longer of the two, with empty slots."""
        rows_a, rows_b = a.next_pos.shape[0], b.next_pos.shape[0]
        out = cls.empty(len(a.layers), len(a.levels), a.block_levels, a.score_levels)
        lengths = [max(x.length, y.length) for x, y in zip(a.levels, b.levels, strict=True)]
        bufs_a, bufs_b = a._slot_buffers(), b._slot_buffers()
        for key in bufs_a.keys() | bufs_b.keys():
            ref, dim, lvl = bufs_a.get(key) or bufs_b[key]
            shape = list(ref.shape)
            shape[0], shape[dim] = rows_a + rows_b, lengths[lvl]
            new = ref.new_zeros(shape)  # zero: empty slots, never kept, position 0
            for src, bufs, first, n in ((a, bufs_a, 0, rows_a), (b, bufs_b, rows_a, rows_b)):
                if key in bufs:
                    m = src.levels[lvl].length
                    new.narrow(0, first, n).narrow(dim, 0, m).copy_(bufs[key][0].narrow(dim, 0, m))
            out._set_slot_buffer(key, new)
        out._refresh_levels(lengths)
        out.next_pos = torch.cat([a.next_pos, b.next_pos])
        return out
