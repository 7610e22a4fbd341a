"""Greedy and beam decoding (`pixelllm.modeling.generation`) on a scripted language model whose answers are
known: the best caption by exhaustive search, and a location for every token that is a function of its prefix.

The scripted model keeps each row's token prefix in the real KV cache (`EncoderDecoderCache`), so beam
reordering goes through the same `reorder_cache` the T5 decoder's cache does.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pixelllm.modeling.generation import Generated, GenerationCancelled, beam_search_n_best, greedy
from pixelllm.tokenizer import EOS_ID, PAD_ID

VOCAB = 4  # PAD, EOS and two words
WORDS = (2, 3)
MAX_LEN = 4


def beam_search(*args, **kwargs) -> list[Generated]:
    """The best hypothesis of `beam_search_n_best` per batch item."""
    return [hypotheses[0] for hypotheses in beam_search_n_best(*args, **kwargs, num_return=1)]


class ScriptedLM:
    """Per batch item a Markov table of log-probs: logp[item, position, previous token, next token]."""

    def __init__(self, batch_size: int, num_beams: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch_size, MAX_LEN, VOCAB, VOCAB, generator=gen) * 2
        logits[..., PAD_ID] = float("-inf")
        self.logp = torch.log_softmax(logits, dim=-1)
        self.rows_item = torch.arange(batch_size * num_beams) // num_beams
        self.points_calls: list[tuple[int, ...]] = []  # the shapes the point head was called on

    def step(self, last, cache):
        # the whole prefix so far, from the cache (reordered by beam search between steps)
        token = last.float().view(-1, 1, 1, 1)
        prefix, _ = cache.self_attention_cache.update(token, token, 0)
        prefix = prefix.view(len(last), -1).long()  # (rows, t + 1), starting with the PAD decoder start
        hidden = torch.full((len(last), MAX_LEN + 1), -1.0)
        hidden[:, : prefix.shape[1]] = prefix.float()
        return hidden, cache

    def logits(self, hidden):
        t = int((hidden >= 0).sum(1)[0]) - 1  # tokens generated so far
        last = hidden[:, t].long()
        return self.logp[self.rows_item[: len(hidden)], t, last]

    def points(self, states):
        """Decoder states (..., MAX_LEN + 1) of whole sequences, as the generators pass them after the loop."""
        self.points_calls.append(tuple(states.shape))
        return corners_of(states), torch.sigmoid(states.clamp(min=0).sum(-1) / 10)

    def score(self, item: int, seq: tuple[int, ...]) -> float:
        """Mean log-prob of `seq` (the beam search's score with length_penalty 1)."""
        prev, total = PAD_ID, 0.0
        for t, tok in enumerate(seq):
            total += float(self.logp[item, t, prev, tok])
            prev = tok
        return total / len(seq)


def corners_of(hidden: torch.Tensor) -> torch.Tensor:
    """A location that identifies the prefix a decoder state has read: (..., 2, 2) in [0, 1]."""
    prefix = hidden.clamp(min=0)
    code = (prefix * torch.tensor([1, 5, 25, 125, 625])).sum(-1) / 3125
    return torch.stack([code, code / 2, code / 3, code / 4], dim=-1).unflatten(-1, (2, 2))


def expected_corners(seq: torch.Tensor) -> torch.Tensor:
    """The corners each token of `seq` must carry: those of the state that emitted it (its prefix)."""
    rows = []
    for i in range(len(seq)):
        hidden = torch.full((1, MAX_LEN + 1), -1.0)
        hidden[0, : i + 1] = torch.tensor([PAD_ID, *seq[:i].tolist()], dtype=torch.float)
        rows.append(corners_of(hidden)[0])
    return torch.stack(rows)


def all_captions() -> list[tuple[int, ...]]:
    """Every sequence beam search can return within MAX_LEN: words then EOS, or MAX_LEN words."""
    out = []
    for n in range(MAX_LEN):
        out += [(*words, EOS_ID) for words in itertools.product(WORDS, repeat=n)]
    return out + list(itertools.product(WORDS, repeat=MAX_LEN))


def test_beam_search_wide_enough_finds_the_exhaustive_best_with_its_points():
    batch, beams = 2, 2**MAX_LEN  # every live prefix fits in the beam: the search is exhaustive
    kinds = set()
    for seed in range(12):
        lm = ScriptedLM(batch, beams, seed)
        results = beam_search(lm.step, lm.logits, lm.points, batch, beams, MAX_LEN, torch.device("cpu"))
        for item, g in enumerate(results):
            best = max(all_captions(), key=lambda s: lm.score(item, s))
            assert tuple(g.ids.tolist()) == best, (seed, item)
            assert g.score == pytest.approx(lm.score(item, best), abs=1e-5)
            torch.testing.assert_close(g.corners, expected_corners(g.ids))
            kinds.add(best[-1] == EOS_ID)
    assert kinds == {True, False}  # both finished captions and captions cut at max length won somewhere


def test_beam_search_goes_on_while_a_running_beam_can_beat_the_finished_ones():
    """Two short captions end at step 2 while a longer, better one is still running: stopping at the first
    `num_beams` finished hypotheses returned a worse caption than greedy's; the search goes on and finds it."""
    lm = ScriptedLM(1, 2, seed=0)
    probs = torch.full((MAX_LEN, VOCAB, VOCAB), 1 / 3)  # (position, previous, next): EOS and the words alike
    probs[0, PAD_ID, [2, 3, EOS_ID]] = torch.tensor([0.85, 0.10, 0.05])
    probs[1, 2, [EOS_ID, 2, 3]] = torch.tensor([0.5, 0.45, 0.05])  # "2 EOS" ends first, "2 2" runs on
    probs[1, 3, [EOS_ID, 2, 3]] = torch.tensor([0.9, 0.05, 0.05])  # and "3 EOS" makes two finished
    probs[2, 2, [2, EOS_ID, 3]] = torch.tensor([0.98, 0.01, 0.01])
    probs[3, 2, [EOS_ID, 2, 3]] = torch.tensor([0.98, 0.01, 0.01])
    probs[..., PAD_ID] = 0
    lm.logp = probs.log()[None]
    best = max(all_captions(), key=lambda s: lm.score(0, s))
    assert best == (2, 2, 2, EOS_ID)
    (got,) = beam_search(lm.step, lm.logits, lm.points, 1, 2, MAX_LEN, torch.device("cpu"))
    assert tuple(got.ids.tolist()) == best and got.score == pytest.approx(lm.score(0, best), abs=1e-5)
    (greedy_caption,) = greedy(lm.step, lm.logits, None, 1, MAX_LEN, torch.device("cpu"))
    assert tuple(greedy_caption.ids.tolist()) == (2, EOS_ID) and greedy_caption.score < got.score


def test_n_best_of_an_exhaustive_search_is_the_exhaustive_ranking():
    batch, beams = 2, 2**MAX_LEN
    for seed in range(6):
        lm = ScriptedLM(batch, beams, seed)
        cpu = torch.device("cpu")
        found = beam_search_n_best(lm.step, lm.logits, lm.points, batch, beams, MAX_LEN, cpu, num_return=5)
        for item, hypotheses in enumerate(found):
            ranked = sorted(all_captions(), key=lambda s: lm.score(item, s), reverse=True)[:5]
            assert [tuple(g.ids.tolist()) for g in hypotheses] == ranked, (seed, item)
            assert [g.score for g in hypotheses] == pytest.approx([lm.score(item, s) for s in ranked], abs=1e-5)
            for g in hypotheses:
                torch.testing.assert_close(g.corners, expected_corners(g.ids))


@pytest.mark.parametrize("beams", [2, 3])
def test_n_best_returns_num_beams_hypotheses_best_first(beams):
    for seed in range(6):
        lm = ScriptedLM(3, beams, seed)
        found = beam_search_n_best(lm.step, lm.logits, lm.points, 3, beams, MAX_LEN, torch.device("cpu"))
        for hypotheses in found:
            assert len(hypotheses) == beams
            assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
    for wrong in (0, beams + 1):
        with pytest.raises(ValueError, match="num_return"):
            beam_search_n_best(lm.step, lm.logits, None, 3, beams, MAX_LEN, torch.device("cpu"), num_return=wrong)


@pytest.mark.parametrize("beams", [1, 2, 3])
def test_narrow_beams_carry_the_points_of_their_own_tokens(beams):
    for seed in range(6):
        lm = ScriptedLM(3, beams, seed)
        results = beam_search(lm.step, lm.logits, lm.points, 3, beams, MAX_LEN, torch.device("cpu"))
        # the point head ran once per result, on the states of all its tokens
        assert lm.points_calls == [(len(g.ids), MAX_LEN + 1) for g in results]
        for g in results:
            assert g.corners.shape == (len(g.ids), 2, 2) and g.confidence.shape == (len(g.ids),)
            torch.testing.assert_close(g.corners, expected_corners(g.ids))
        text_only = beam_search(lm.step, lm.logits, None, 3, beams, MAX_LEN, torch.device("cpu"))
        for g, t in zip(results, text_only):
            assert torch.equal(g.ids, t.ids) and g.score == t.score and t.corners is None and t.confidence is None


def test_greedy_follows_the_argmax_and_trims_after_eos():
    for seed in range(6):
        lm = ScriptedLM(3, 1, seed)
        results = greedy(lm.step, lm.logits, lm.points, 3, MAX_LEN, torch.device("cpu"))
        assert lm.points_calls == [(3, max(len(g.ids) for g in results), MAX_LEN + 1)]  # once, on (B, T, D)
        for item, g in enumerate(results):
            prev, expected = PAD_ID, []
            for t in range(MAX_LEN):
                prev = int(lm.logp[item, t, prev].argmax())
                expected.append(prev)
                if prev == EOS_ID:
                    break
            assert g.ids.tolist() == expected
            assert g.score == pytest.approx(lm.score(item, tuple(expected)), abs=1e-5)
            torch.testing.assert_close(g.corners, expected_corners(g.ids))


@pytest.mark.parametrize("beams", [1, 3])
def test_should_stop_cancels_before_the_next_decoder_step(beams):
    """Asked before every step: decoding that would run MAX_LEN steps stops after the two allowed."""
    lm = ScriptedLM(2, beams, seed=0)
    lm.logp[..., EOS_ID] = float("-inf")  # never finishes early: every step up to MAX_LEN would run
    steps, asked = [], []

    def step(last, cache):
        steps.append(len(last))
        return lm.step(last, cache)

    def should_stop() -> bool:
        asked.append(len(steps))
        return len(steps) == 2

    def decode(stop):
        if beams == 1:
            return greedy(step, lm.logits, lm.points, 2, MAX_LEN, torch.device("cpu"), stop)
        return beam_search(step, lm.logits, lm.points, 2, beams, MAX_LEN, torch.device("cpu"), should_stop=stop)

    assert all(len(g.ids) == MAX_LEN for g in decode(lambda: False)) and len(steps) == MAX_LEN
    steps.clear()
    with pytest.raises(GenerationCancelled):
        decode(should_stop)
    assert steps == [2 * beams] * 2 and asked == [0, 1, 2]


@pytest.mark.parametrize("beams", [1, 3])
def test_no_tokens_to_decode_is_a_clear_error(beams):
    """`max_new_tokens=0` said so before any decoder step (it had failed in `torch.stack` or divided by zero)."""
    lm = ScriptedLM(2, beams, seed=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        if beams == 1:
            greedy(lm.step, lm.logits, lm.points, 2, 0, torch.device("cpu"))
        else:
            beam_search_n_best(lm.step, lm.logits, lm.points, 2, beams, 0, torch.device("cpu"))
    assert not lm.points_calls
