"""Prompt-prefix sharing: score many sequences that start with the same tokens (n samples of one
prompt, multi-turn trajectories with a common history) with ONE forward of the shared prefix.

Plan (`plan_groups`): sort the batch's sequences lexicographically; the longest common prefix of
any set is then the minimum of the adjacent LCPs over its sorted run, so the best partition into
prefix groups is found by a small dynamic program over contiguous runs (value of a group = tokens
saved = P x (members - 1)). Groups whose prefix is shorter than `min_prefix` are scored plainly.

Forward (`shared_forward`): one pass over the G group prefixes [G, Pmax] (right padded) with a KV
cache; the cache rows are then selected per member (row g repeated n_g times) and only the
continuations [N, Cmax] are forwarded, with position ids P_g + j and a 2-D mask that hides each
row's prompt padding [P_g, Pmax) and its own right padding. Hidden states of positions inside the
prefix come from the prefix pass (the last prefix position predicts the first continuation token).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def plan_groups(seqs: list[np.ndarray], min_prefix: int = 16, window: int = 256) -> list[tuple[int, list[int]]]:
    """Partition sequence indices into prefix groups. Returns (P, members) pairs: P > 0 for shared
    groups (>= 2 members, every member has >= 1 token after the P shared ones), P = 0 for singles."""
    n = len(seqs)
    if n < 2:
        return [(0, list(range(n)))] if n else []
    order = sorted(range(n), key=lambda i: seqs[i].astype(">i8").tobytes())
    adj = [common_prefix(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]
    lens = [len(seqs[i]) for i in order]
    best = [0] * (n + 1)          # best[j] = max tokens saved over the first j sorted sequences
    cut = [(0, 0)] * (n + 1)      # (start of the last group, its P)
    for j in range(n):            # last group = sorted[i..j]
        best[j + 1], cut[j + 1] = best[j], (j, 0)
        run, short = 1 << 62, lens[j]
        for i in range(j - 1, max(-1, j - window), -1):
            run = min(run, adj[i])
            short = min(short, lens[i])
            p = min(run, short - 1)
            if p < min_prefix:
                break
            v = best[i] + p * (j - i)
            if v > best[j + 1]:
                best[j + 1], cut[j + 1] = v, (i, p)
    groups: list[tuple[int, list[int]]] = []
    j = n
    while j > 0:
        i, p = cut[j]
        members = [order[k] for k in range(i, j)]
        if p > 0:
            groups.append((p, sorted(members)))
        else:
            groups.extend((0, [m]) for m in members)
        j = i
    return groups[::-1]


def _cache_kwarg(body) -> str:
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _new_cache(body):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=body.config)
    except TypeError:
        return DynamicCache()


def _select_rows(cache, idx: torch.Tensor) -> None:
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
        return
    for layer in cache.layers:  # pragma: no cover - older cache layouts
        layer.keys = layer.keys.index_select(0, idx)
        layer.values = layer.values.index_select(0, idx)


@torch.inference_mode()
def shared_forward(body, seqs: list[np.ndarray], groups: list[tuple[int, list[int]]], device,
                   pad_id: int = 0) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, int]], dict]:
    """Forward every member of the shared `groups` (P > 0). Returns {seq index: (prefix hidden
    [P, H], continuation hidden [len - P, H], P)} and counters (forwarded / padded tokens)."""
    groups = [g for g in groups if g[0] > 0]
    Ps = [p for p, _ in groups]
    G, pmax = len(groups), max(Ps)
    prompt = torch.full((G, pmax), pad_id, dtype=torch.long)
    for g, (p, members) in enumerate(groups):
        prompt[g, :p] = torch.from_numpy(seqs[members[0]][:p])
    prompt = prompt.to(device, non_blocking=True)
    p_t = torch.tensor(Ps)
    pmask = None if min(Ps) == pmax else (torch.arange(pmax)[None, :] < p_t[:, None]).long().to(device)
    kw = _cache_kwarg(body)
    cache = _new_cache(body)
    ph = body(input_ids=prompt, attention_mask=pmask, use_cache=True, **{kw: cache}).last_hidden_state

    rows = [(g, i) for g, (_, members) in enumerate(groups) for i in members]
    conts = [seqs[i][Ps[g]:] for g, i in rows]
    clens = [len(c) for c in conts]
    cmax = max(clens)
    _select_rows(cache, torch.tensor([g for g, _ in rows], device=device))
    cont = torch.full((len(rows), cmax), pad_id, dtype=torch.long)
    for r, c in enumerate(conts):
        cont[r, : len(c)] = torch.from_numpy(c)
    row_p = torch.tensor([Ps[g] for g, _ in rows])
    pos = (row_p[:, None] + torch.arange(cmax)[None, :]).to(device)
    mask = None  # uniform prefixes and continuations: the causal mask alone is right
    if min(Ps) != pmax or min(clens) != cmax:
        mask = torch.cat([torch.arange(pmax)[None, :] < row_p[:, None],
                          torch.arange(cmax)[None, :] < torch.tensor(clens)[:, None]], dim=1).long().to(device)
    ch = body(input_ids=cont.to(device, non_blocking=True), attention_mask=mask, position_ids=pos,
              use_cache=True, **{kw: cache}).last_hidden_state
    del cache
    out = {}
    for r, (g, i) in enumerate(rows):
        out[i] = (ph[g, : Ps[g]], ch[r, : clens[r]], Ps[g])
    counters = {"forward_tokens": G * pmax + len(rows) * cmax,
                "padded_tokens": G * pmax - sum(Ps) + len(rows) * cmax - sum(clens),
                "shared_prefix_tokens": sum(p * (len(m) - 1) for p, m in groups)}
    return out, counters


def rows_for(prefix_hidden: torch.Tensor, cont_hidden: torch.Tensor, p: int, start: int, end: int) -> torch.Tensor:
    """Hidden rows of target positions [start, end): row of target j sits at position j - 1."""
    a, b = start - 1, end - 1
    parts = []
    if a < p:
        parts.append(prefix_hidden[a: min(b, p)])
    if b > p:
        parts.append(cont_hidden[max(a, p) - p: b - p])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
