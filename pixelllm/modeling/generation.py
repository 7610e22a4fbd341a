"""Decoding with a location for every token: greedy (also as a token-by-token iterator) and beam search.

Each step runs the T5 decoder once with its KV cache and the vocabulary head on its state. The decoder
states that emitted the tokens are kept (per beam for beam search) and the point head runs after the loop
on them (greedy: once on the batch; beam search: once per returned hypothesis), so every generated token
comes with its word-box corners and a confidence at the cost of small MLP calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ..tokenizer import EOS_ID, PAD_ID

# (decoder input ids (B, 1), cache) -> (decoder state (B, D), updated cache)
DecodeStep = Callable[[torch.Tensor, EncoderDecoderCache], tuple[torch.Tensor, EncoderDecoderCache]]
# decoder states (B, D) -> vocabulary logits (B, V)
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
# decoder states (..., D) -> corners (..., 2, 2), confidence (...); None decodes text only
PointsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# asked before every decoder step; True stops decoding with `GenerationCancelled` (nobody wants the result)
ShouldStop = Callable[[], bool]


class GenerationCancelled(Exception):
    """Decoding stopped because `should_stop()` said so (e.g. every caller of a served batch went away)."""


def _check(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise GenerationCancelled("decoding stopped: should_stop() returned True")


@dataclass
class Generated:
    """One generated sequence: token ids (T,) ending in EOS when finished, corners (T, 2, 2), confidence (T,)."""

    ids: torch.Tensor
    corners: torch.Tensor | None
    confidence: torch.Tensor | None
    score: float


@dataclass
class _Hypothesis:
    """A beam search candidate: token ids (T,), the decoder states (T, D) that emitted them, its score."""

    ids: torch.Tensor
    states: torch.Tensor
    score: float


def check_length(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1 (or None for the model's default), got {max_new_tokens}")


def new_cache() -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def iter_greedy(
    step: DecodeStep,
    logits_fn: LogitsFn,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    should_stop: ShouldStop | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield, per step: next ids (B,), the decoder states (B, D) that emitted them, and their log-probs (B,).

    Sequences that already emitted EOS receive PAD. Stops when all are finished or at `max_new_tokens`;
    raises `GenerationCancelled` before a step if `should_stop()` is True.
    """
    check_length(max_new_tokens)
    cache = new_cache()
    last = torch.full((batch_size, 1), PAD_ID, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        _check(should_stop)
        hidden, cache = step(last, cache)
        logp = torch.log_softmax(logits_fn(hidden).float(), dim=-1)
        next_ids = logp.argmax(dim=-1)
        next_ids = torch.where(done, torch.full_like(next_ids, PAD_ID), next_ids)
        yield next_ids, hidden, logp.gather(1, next_ids[:, None])[:, 0]
        done = done | (next_ids == EOS_ID)
        if bool(done.all()):
            return
        last = next_ids[:, None]


def greedy(
    step: DecodeStep,
    logits_fn: LogitsFn,
    points_fn: PointsFn | None,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    should_stop: ShouldStop | None = None,
) -> list[Generated]:
    """Greedy decoding of a batch; each result is trimmed after its EOS."""
    ids, states, logps = [], [], []
    for next_ids, hidden, lp in iter_greedy(step, logits_fn, batch_size, max_new_tokens, device, should_stop):
        ids.append(next_ids)
        states.append(hidden)
        logps.append(lp)
    all_ids = torch.stack(ids, dim=1)
    all_logp = torch.stack(logps, dim=1)
    corners = confidence = None
    if points_fn is not None:
        corners, confidence = points_fn(torch.stack(states, dim=1))  # (B, T, 2, 2), (B, T)
    results = []
    for b in range(batch_size):
        eos = (all_ids[b] == EOS_ID).nonzero()
        length = int(eos[0]) + 1 if len(eos) else all_ids.shape[1]
        results.append(
            Generated(
                ids=all_ids[b, :length],
                corners=corners[b, :length] if corners is not None else None,
                confidence=confidence[b, :length] if confidence is not None else None,
                score=float(all_logp[b, :length].mean()),
            )
        )
    return results


def beam_search_n_best(
    step: DecodeStep,
    logits_fn: LogitsFn,
    points_fn: PointsFn | None,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    device: torch.device,
    length_penalty: float = 1.0,
    should_stop: ShouldStop | None = None,
    num_return: int | None = None,
) -> list[list[Generated]]:
    """Beam search over a batch whose decoder inputs are already repeated `num_beams` times (B*K rows); per batch
    item at most `num_return` (1 to `num_beams`, default `num_beams`) best hypotheses, best first.

    Hypotheses are ranked by sum of log-probs / length**length_penalty; a batch item keeps its `num_beams` best
    finished hypotheses and stops once none of its running beams can beat the worst of them (Hugging Face's
    `early_stopping=False` test: the best running beam's score as if it ended now); beams still running at
    `max_new_tokens` compete with the finished ones. Each beam carries the decoder states of its own tokens,
    and the point head runs on the returned hypotheses' states. Raises `GenerationCancelled` before a step if
    `should_stop()` is True.
    """
    check_length(max_new_tokens)
    k = num_beams
    num_return = k if num_return is None else num_return
    if not 1 <= num_return <= k:
        raise ValueError(f"num_return must be between 1 and num_beams ({k}), got {num_return}")
    cache = new_cache()
    last = torch.full((batch_size * k, 1), PAD_ID, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch_size, k, device=device)
    beam_scores[:, 1:] = float("-inf")
    seqs = torch.zeros(batch_size * k, 0, dtype=torch.long, device=device)
    states = None  # (B*K, t, D): the decoder state that emitted each token of each beam
    eos = torch.tensor([EOS_ID], device=device)
    finished: list[list[_Hypothesis]] = [[] for _ in range(batch_size)]  # each item's best k, best first
    done = [False] * batch_size
    for t in range(max_new_tokens):
        _check(should_stop)
        hidden, cache = step(last, cache)
        states = hidden[:, None] if states is None else torch.cat([states, hidden[:, None]], dim=1)
        logp = torch.log_softmax(logits_fn(hidden).float(), dim=-1)
        vocab = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(batch_size, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        src_rows, new_tokens, new_scores = [], [], []
        for b in range(batch_size):
            chosen = 0
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                row, token = b * k + idx // vocab, idx % vocab
                if done[b] or score == float("-inf"):  # the rest extend dead beams or banned ids
                    break
                if token == EOS_ID:
                    ids = torch.cat([seqs[row], eos])
                    finished[b].append(_Hypothesis(ids, states[row], score / (t + 1) ** length_penalty))
                    finished[b] = sorted(finished[b], key=lambda h: h.score, reverse=True)[:k]
                    continue
                src_rows.append(row)
                new_tokens.append(token)
                new_scores.append(score)
                chosen += 1
                if chosen == k:
                    break
            if chosen and len(finished[b]) == k:  # the best running beam (chosen first), were it to end now
                done[b] = finished[b][-1].score >= new_scores[-chosen] / (t + 1) ** length_penalty
            elif not chosen:
                done[b] = True
            while chosen < k:  # batch item done: keep shapes with dead beams
                src_rows.append(b * k)
                new_tokens.append(PAD_ID)
                new_scores.append(float("-inf"))
                chosen += 1
        if all(done):
            break
        index = torch.tensor(src_rows, device=device)
        tokens = torch.tensor(new_tokens, device=device)
        cache.reorder_cache(index)
        seqs = torch.cat([seqs[index], tokens[:, None]], dim=1)
        states = states[index]
        beam_scores = torch.tensor(new_scores, device=device).view(batch_size, k)
        last = tokens[:, None]
    results: list[list[Generated]] = []
    for b in range(batch_size):
        pool = list(finished[b])
        if not done[b]:  # stopped by max_new_tokens: the running beams compete with the finished ones
            for j in range(k):
                row = b * k + j
                score = float(beam_scores[b, j])
                if score != float("-inf"):
                    pool.append(_Hypothesis(seqs[row], states[row], score / seqs.shape[1] ** length_penalty))
        ranked = sorted(pool, key=lambda h: h.score, reverse=True)[:num_return]
        results.append([_generated(h, points_fn) for h in ranked])
    return results


def _generated(hypothesis: _Hypothesis, points_fn: PointsFn | None) -> Generated:
    corners, confidence = points_fn(hypothesis.states) if points_fn is not None else (None, None)
    return Generated(ids=hypothesis.ids, corners=corners, confidence=confidence, score=hypothesis.score)
