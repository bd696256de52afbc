"""Next-token sampling as a pure tensor function (temperature, top-k, top-p, per-row seeds).

The returned log-prob is the one SGLang reports: log_softmax(logits / T) at the sampled token,
taken BEFORE top-k / top-p masking (greedy rows: unscaled log_softmax(logits)). The trainer's
importance ratios and the consistency test use exactly this definition.
"""

from __future__ import annotations

import torch

from rollout.types import GREEDY_TEMPERATURE


def filter_logprobs_(logp_B_V: torch.Tensor, top_p_B: torch.Tensor, top_k_B: torch.Tensor) -> torch.Tensor:
    """Set tokens outside each row's top-k / nucleus to -inf (in place). k <= 0 and p >= 1 are off."""
    V = logp_B_V.shape[-1]
    need = (top_p_B < 1.0) | ((top_k_B > 0) & (top_k_B < V))
    if not bool(need.any()):
        return logp_B_V
    sorted_logp, order = logp_B_V.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=logp_B_V.device)
    k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))
    drop = rank_V[None, :] >= k_B[:, None]
    probs = sorted_logp.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass BEFORE it >= p.
    mass_before = probs.cumsum(-1) - probs
    drop |= mass_before >= top_p_B[:, None]
    drop[:, 0] = False
    sorted_logp = sorted_logp.masked_fill(drop, float("-inf"))
    return logp_B_V.scatter_(-1, order, sorted_logp)


def sample_tokens(logits_B_V: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor,
                  top_k_B: torch.Tensor, generators: list[torch.Generator | None]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. Returns (token ids [B], sampling log-probs [B], float32)."""
    logits_B_V = logits_B_V.float()
    greedy_B = temperature_B < GREEDY_TEMPERATURE
    scale_B = torch.where(greedy_B, torch.ones_like(temperature_B), temperature_B)
    logp_B_V = torch.log_softmax(logits_B_V / scale_B[:, None], dim=-1)
    filtered = filter_logprobs_(logp_B_V.clone(), top_p_B, top_k_B)
    probs_B_V = filtered.exp()
    ids_B = torch.empty(logits_B_V.shape[0], dtype=torch.long, device=logits_B_V.device)
    if all(g is None for g in generators):
        ids_B[:] = torch.multinomial(probs_B_V, 1).squeeze(-1)
    else:
        for i, g in enumerate(generators):
            ids_B[i] = torch.multinomial(probs_B_V[i], 1, generator=g)[0]
    ids_B = torch.where(greedy_B, logits_B_V.argmax(-1), ids_B)
    return ids_B, logp_B_V.gather(-1, ids_B[:, None]).squeeze(-1)
