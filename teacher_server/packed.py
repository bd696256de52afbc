"""Packed forward: a whole batch as ONE row of tokens with a tree-shaped attention mask.

Why: the KV-cache route to prompt-prefix sharing (`prefix.shared_forward`) runs the prompt pass
and the continuation pass as two forwards with a HF cache object in between. The cache is
per-layer Python state, so those forwards cannot use the compiled whole-layer graphs
(`model.compile_body`), and the continuations attend through a padded 2-D mask. Packing removes
both: every sequence of a batch is laid end to end in one row, each prompt of a prefix group
only once, and a mask says who sees whom:

    token q may attend key k  iff  k <= q  and  doc[k] == doc[q]  and  (seg[k] == seg[q] or seg[k] == 0)

`doc` numbers the groups (a sequence scored alone is a group of its own), `seg` is 0 on a group's
shared prefix (and on a lone sequence) and j + 1 on member j's continuation. Position ids restart
per sequence (a continuation continues at P), so every token sees exactly the keys and positions
it has in its own unshared forward: results equal the padded path up to kernel rounding (tests).
No padding between sequences; the row is padded at the end to a multiple of `BLOCK` with tokens
of their own document, which no real token sees.

Attention kernels: on CUDA the mask is a FlexAttention `BlockMask` (whole 128 x 128 tiles outside
the tree are skipped, whole tiles inside it run unmasked; the tiles are classified from each
token's two key intervals, `block_tiles`) and the body runs its compiled
whole-layer graphs; elsewhere (CPU, tests) it is a dense boolean [1, 1, T, T] mask through SDPA.
Both go through one attention function registered with transformers under `ATTN_NAME`, which
hands anything that is not a `BlockMask` to transformers' SDPA function unchanged, so the plain
path of the same model keeps working exactly as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("opd.teacher")

ATTN_NAME = "opd_sdpa"
BLOCK = 128


def _flex_kernel_options():
    """OPD_FLEX_KERNEL_OPTIONS: FlexAttention kernel options as a JSON object, e.g.
    '{"BLOCK_M": 128, "BLOCK_N": 64}'; unset or empty = torch's choice."""
    raw = os.environ.get("OPD_FLEX_KERNEL_OPTIONS") or "null"
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"OPD_FLEX_KERNEL_OPTIONS={raw!r} is not JSON ({exc}); expected an object such as "
                         '\'{"BLOCK_M": 128, "BLOCK_N": 64}\'') from None
    if opts is not None and not isinstance(opts, dict):
        raise ValueError(f"OPD_FLEX_KERNEL_OPTIONS={raw!r}: expected a JSON object of kernel options")
    return opts


FLEX_KERNEL_OPTIONS = _flex_kernel_options()

_flex_lock = threading.Lock()
_flex_fn = None


def _flex_attention():
    """torch.compile'd FlexAttention (eager FlexAttention materialises the scores: never use it)."""
    global _flex_fn
    with _flex_lock:
        if _flex_fn is None:
            from torch.nn.attention.flex_attention import flex_attention

            _flex_fn = torch.compile(flex_attention, dynamic=True)
        return _flex_fn


def _is_block_mask(m) -> bool:
    return type(m).__name__ == "BlockMask"


def opd_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention function of `ATTN_NAME`: FlexAttention for a `BlockMask`, SDPA otherwise."""
    if _is_block_mask(attention_mask):
        out = _flex_attention()(query, key, value, block_mask=attention_mask, scale=scaling,
                                enable_gqa=query.shape[1] != key.shape[1], kernel_options=FLEX_KERNEL_OPTIONS)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def install(model) -> bool:
    """Register `ATTN_NAME` with transformers and switch `model` to it (SDPA models only, since
    everything that is not packed still goes to SDPA). False, model untouched, when it does not
    apply: another attention implementation, sliding-window layers, or an old transformers."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) == ATTN_NAME:
        return True
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTN_NAME, opd_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    cfg._attn_implementation = ATTN_NAME
    return True


@dataclass
class Layout:
    """One packed row: token ids, position ids, document and segment ids ([T] int64, T a multiple
    of BLOCK), and for every sequence of the batch the packed index of each of its positions
    (`where[i]`: [len_i] int64). The keys token q sees, as intervals: [lo1[q], hi1[q]) (its
    group's prefix, for a continuation token; empty otherwise) and [lo2[q], q] (its own run)."""
    ids: np.ndarray
    pos: np.ndarray
    doc: np.ndarray
    seg: np.ndarray
    where: list[np.ndarray]
    real_tokens: int
    lo1: np.ndarray
    hi1: np.ndarray
    lo2: np.ndarray

    @property
    def tokens(self) -> int:
        return len(self.ids)


def plan_layout(seqs: list[np.ndarray], groups: list[tuple[int, list[int]]], pad_id: int = 0) -> Layout:
    """Lay the `groups` of `prefix.plan_groups` (P > 0: shared prefix of P tokens; P = 0: one
    sequence alone) end to end."""
    ids, pos, doc, seg, lo1, hi1, lo2 = [], [], [], [], [], [], []
    where: list[np.ndarray | None] = [None] * len(seqs)
    off = 0

    def run(tokens, first_pos, g, s, prefix=(0, 0)):
        n = len(tokens)
        ids.append(tokens); pos.append(first_pos + np.arange(n)); doc.append(np.full(n, g)); seg.append(np.full(n, s))
        lo1.append(np.full(n, prefix[0])); hi1.append(np.full(n, prefix[1])); lo2.append(np.full(n, off))
        return off + np.arange(n)

    for g, (p, members) in enumerate(groups):
        if p == 0:
            (i,) = members
            where[i] = run(seqs[i], 0, g, 0)
            off += len(seqs[i])
            continue
        prefix_at = run(seqs[members[0]][:p], 0, g, 0)
        off += p
        for j, i in enumerate(members):
            where[i] = np.concatenate([prefix_at, run(seqs[i][p:], p, g, j + 1, (prefix_at[0], prefix_at[-1] + 1))])
            off += len(seqs[i]) - p
    real = off
    pad = -off % BLOCK
    if pad:  # a document of its own (no real token sees it); positions from 0
        run(np.full(pad, pad_id), 0, len(groups), 0)
    cat = lambda parts: np.concatenate(parts).astype(np.int64)  # noqa: E731
    return Layout(cat(ids), cat(pos), cat(doc), cat(seg), where, real,  # type: ignore[arg-type]
                  cat(lo1), cat(hi1), cat(lo2))


def tree_visible(doc: torch.Tensor, seg: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Whether query position q may attend key position k (the rule in the module docstring);
    q and k broadcast (index tensors, or FlexAttention's scalar indices)."""
    return (k <= q) & (doc[k] == doc[q]) & ((seg[k] == seg[q]) | (seg[k] == 0))


def dense_mask(doc: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """The tree mask as a boolean [1, 1, T, T] tensor (True = attend)."""
    idx = torch.arange(doc.shape[0], device=doc.device)
    return tree_visible(doc, seg, idx[:, None], idx[None, :])[None, None]


def block_tiles(lo1: torch.Tensor, hi1: torch.Tensor, lo2: torch.Tensor):
    """Which BLOCK x BLOCK tiles of the tree mask are partly / wholly visible ([nb, nb] bool
    each), from each query's two key intervals: no [T, T] mask is ever built ([T, nb] counts)."""
    t = lo1.shape[0]
    nb = t // BLOCK
    k0 = torch.arange(nb, device=lo1.device, dtype=torch.int32) * BLOCK
    q = torch.arange(t, device=lo1.device, dtype=torch.int32)
    lo1, hi1, lo2 = lo1.int()[:, None], hi1.int()[:, None], lo2.int()[:, None]
    seen = (torch.minimum(hi1, k0 + BLOCK) - torch.maximum(lo1, k0)).clamp_(min=0)
    seen += (torch.minimum(q[:, None] + 1, k0 + BLOCK) - torch.maximum(lo2, k0)).clamp_(min=0)
    seen = seen.view(nb, BLOCK, nb)
    full = (seen == BLOCK).all(1)
    return (seen > 0).any(1) & ~full, full


def block_mask(layout: Layout, doc: torch.Tensor, seg: torch.Tensor):
    """The tree mask as a FlexAttention BlockMask: tiles classified by `block_tiles` (building
    it with `create_block_mask` evaluates the mask at all T x T points: 18 ms at T = 16k on an
    H100), the mask function applied inside partly visible tiles only."""
    from torch.nn.attention.flex_attention import BlockMask

    def tree(b, h, q, k):
        return tree_visible(doc, seg, q, k)

    dev = doc.device
    partial, full = block_tiles(*(torch.from_numpy(a).to(dev, non_blocking=True)
                                  for a in (layout.lo1, layout.hi1, layout.lo2)))

    def listed(m):  # (count per row, column indices with the listed ones first), [1, 1, ...] int32
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)
    t = layout.tokens
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=tree,
                                    seq_lengths=(t, t))


@torch.inference_mode()
def packed_forward(body, layout: Layout, device, flex: bool) -> torch.Tensor:
    """Final hidden states [T, H] of the packed row (`flex`: BlockMask + FlexAttention, else a
    dense mask through SDPA). The body must have been switched to `ATTN_NAME` by `install`."""
    ids = torch.from_numpy(layout.ids).to(device, non_blocking=True)[None]
    pos = torch.from_numpy(layout.pos).to(device, non_blocking=True)[None]
    doc = torch.from_numpy(layout.doc).to(device, non_blocking=True)
    seg = torch.from_numpy(layout.seg).to(device, non_blocking=True)
    mask = block_mask(layout, doc, seg) if flex else dense_mask(doc, seg)
    out = body(input_ids=ids, position_ids=pos, attention_mask={"full_attention": mask}, use_cache=False)
    return out.last_hidden_state[0]
