"""Decoding with a location for every token: greedy (also as a token-by-token iterator) and beam search.

Each step runs the T5 decoder once with its KV cache; the vocabulary head and the point head read the
same decoder state, so every generated token comes with its word-box corners and a confidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ..tokenizer import EOS_ID, PAD_ID

# (decoder input ids (B, 1), cache) -> (decoder state (B, D), updated cache)
DecodeStep = Callable[[torch.Tensor, EncoderDecoderCache], tuple[torch.Tensor, EncoderDecoderCache]]
# decoder states (B, D) -> (logits (B, V), corners (B, 2, 2), confidence logits (B,))
Heads = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


@dataclass
class Generated:
    """One generated sequence: token ids (T,) ending in EOS when finished, corners (T, 2, 2), confidence (T,)."""

    ids: torch.Tensor
    corners: torch.Tensor | None
    confidence: torch.Tensor | None
    score: float


def new_cache() -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def iter_greedy(
    step: DecodeStep, heads: Heads, batch_size: int, max_new_tokens: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
    """Yield, per step: next ids (B,), corners (B, 2, 2), confidence (B,), and log-prob (B,) of each id.

    Sequences that already emitted EOS receive PAD. Stops when all are finished or at `max_new_tokens`.
    """
    cache = new_cache()
    last = torch.full((batch_size, 1), PAD_ID, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        hidden, cache = step(last, cache)
        logits, corners, confidence = heads(hidden)
        logp = torch.log_softmax(logits.float(), dim=-1)
        next_ids = logp.argmax(dim=-1)
        next_ids = torch.where(done, torch.full_like(next_ids, PAD_ID), next_ids)
        yield next_ids, corners, confidence, logp.gather(1, next_ids[:, None])[:, 0]
        done = done | (next_ids == EOS_ID)
        if bool(done.all()):
            return
        last = next_ids[:, None]


def greedy(
    step: DecodeStep, heads: Heads, batch_size: int, max_new_tokens: int, device: torch.device
) -> list[Generated]:
    """Greedy decoding of a batch; each result is trimmed after its EOS."""
    ids, corners, confidence, logps = [], [], [], []
    for next_ids, c, s, lp in iter_greedy(step, heads, batch_size, max_new_tokens, device):
        ids.append(next_ids)
        corners.append(c)
        confidence.append(s)
        logps.append(lp)
    all_ids = torch.stack(ids, dim=1)
    all_logp = torch.stack(logps, dim=1)
    all_corners = torch.stack(corners, dim=1) if corners[0] is not None else None
    all_conf = torch.stack(confidence, dim=1) if confidence[0] is not None else None
    results = []
    for b in range(batch_size):
        eos = (all_ids[b] == EOS_ID).nonzero()
        length = int(eos[0]) + 1 if len(eos) else all_ids.shape[1]
        results.append(
            Generated(
                ids=all_ids[b, :length],
                corners=all_corners[b, :length] if all_corners is not None else None,
                confidence=all_conf[b, :length] if all_conf is not None else None,
                score=float(all_logp[b, :length].mean()),
            )
        )
    return results


def beam_search(
    step: DecodeStep,
    heads: Heads,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    device: torch.device,
    length_penalty: float = 1.0,
) -> list[Generated]:
    """Beam search over a batch whose decoder inputs are already repeated `num_beams` times (B*K rows).

    Hypotheses are ranked by sum of log-probs / length**length_penalty; a batch item stops once it has
    `num_beams` finished hypotheses. Each beam carries the corners and confidence of its own tokens.
    """
    k = num_beams
    cache = new_cache()
    last = torch.full((batch_size * k, 1), PAD_ID, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch_size, k, device=device)
    beam_scores[:, 1:] = float("-inf")
    seqs = torch.zeros(batch_size * k, 0, dtype=torch.long, device=device)
    hist_corners: torch.Tensor | None = None
    hist_conf: torch.Tensor | None = None
    finished: list[list[Generated]] = [[] for _ in range(batch_size)]
    for t in range(max_new_tokens):
        hidden, cache = step(last, cache)
        logits, corners, confidence = heads(hidden)
        logp = torch.log_softmax(logits.float(), dim=-1)
        vocab = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(batch_size, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        src_rows, new_tokens, new_scores = [], [], []
        for b in range(batch_size):
            chosen = 0
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                row, token = b * k + idx // vocab, idx % vocab
                if len(finished[b]) >= k or score == float("-inf"):  # the rest extend dead beams or banned ids
                    break
                if token == EOS_ID:
                    finished[b].append(
                        _hypothesis(
                            seqs,
                            hist_corners,
                            hist_conf,
                            corners,
                            confidence,
                            row,
                            token,
                            score,
                            t,
                            length_penalty,
                        )
                    )
                    continue
                src_rows.append(row)
                new_tokens.append(token)
                new_scores.append(score)
                chosen += 1
                if chosen == k:
                    break
            while chosen < k:  # batch item already done: keep shapes with dead beams
                src_rows.append(b * k)
                new_tokens.append(PAD_ID)
                new_scores.append(float("-inf"))
                chosen += 1
        if all(len(f) >= k for f in finished):
            break
        index = torch.tensor(src_rows, device=device)
        tokens = torch.tensor(new_tokens, device=device)
        cache.reorder_cache(index)
        seqs = torch.cat([seqs[index], tokens[:, None]], dim=1)
        if corners is not None:
            step_corners = corners[index][:, None]
            hist_corners = step_corners if hist_corners is None else torch.cat([hist_corners[index], step_corners], 1)
            step_conf = confidence[index][:, None]
            hist_conf = step_conf if hist_conf is None else torch.cat([hist_conf[index], step_conf], 1)
        beam_scores = torch.tensor(new_scores, device=device).view(batch_size, k)
        last = tokens[:, None]
    results = []
    for b in range(batch_size):
        pool = list(finished[b])
        if len(pool) < k:  # stopped by max_new_tokens: the running beams compete with the finished ones
            for j in range(k):
                row = b * k + j
                score = float(beam_scores[b, j])
                if score == float("-inf"):
                    continue
                pool.append(
                    Generated(
                        ids=seqs[row],
                        corners=hist_corners[row] if hist_corners is not None else None,
                        confidence=hist_conf[row] if hist_conf is not None else None,
                        score=score / max(seqs.shape[1], 1) ** length_penalty,
                    )
                )
        results.append(max(pool, key=lambda g: g.score))
    return results


def _hypothesis(
    seqs: torch.Tensor,
    hist_corners: torch.Tensor | None,
    hist_conf: torch.Tensor | None,
    corners: torch.Tensor | None,
    confidence: torch.Tensor | None,
    row: int,
    token: int,
    score: float,
    t: int,
    length_penalty: float,
) -> Generated:
    """A finished hypothesis: beam `row`'s history plus the final `token` (EOS) emitted at step `t`."""
    ids = torch.cat([seqs[row], torch.tensor([token], device=seqs.device)])
    c = s = None
    if corners is not None:
        c = corners[row][None] if hist_corners is None else torch.cat([hist_corners[row], corners[row][None]])
        s = confidence[row][None] if hist_conf is None else torch.cat([hist_conf[row], confidence[row][None]])
    return Generated(ids=ids, corners=c, confidence=s, score=score / (t + 1) ** length_penalty)
