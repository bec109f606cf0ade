"""Beam search and greedy decoding on small real and hand-wired models."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megavac.evaluation.generate import SearchConfig, beam_search, length_batches, max_lengths, translate
from megavac.model import ModelConfig, Transformer
from megavac.tokens import source_ids

PAD, UNK, BOS, EOS = 0, 1, 2, 3
A, B, C, D, E, F, G = range(4, 11)


class Bigram(nn.Module):
    """Next-token distribution fixed by the previous token; the source is ignored."""

    def __init__(self, table: dict, vocab: int = 11):
        super().__init__()
        probs = torch.full((vocab, vocab), 1e-6)
        for prev, nxt in table.items():
            for tok, p in nxt.items():
                probs[prev, tok] = p
        self.logp = (probs / probs.sum(1, keepdim=True)).log()
        self.cfg = SimpleNamespace(max_positions=64, vocab_size=vocab)

    def encode(self, src):
        return src[:, :, None].float()

    def decode(self, tgt_in, memory, src, last_only=False):
        return self.logp[tgt_in]


class Copy(nn.Module):
    """Emits the source sentence (between tag and EOS) and then EOS, whatever it generated."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.cfg = SimpleNamespace(max_positions=64, vocab_size=vocab)

    def encode(self, src):
        return src[:, :, None].float()

    def decode(self, tgt_in, memory, src, last_only=False):
        Bn, T = tgt_in.shape
        pos = torch.arange(1, T + 1).clamp(max=src.shape[1] - 1)
        want = src[:, pos]
        want = torch.where(want == PAD, torch.full_like(want, EOS), want)
        return torch.nn.functional.one_hot(want, self.cfg.vocab_size).float() * 10.0


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=30, d_model=32, n_heads=2, enc_layers=1, dec_layers=1, d_ff=64, dropout=0.0,
                      max_positions=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # make EOS likely enough that hypotheses end at different lengths
        model.embed.weight[EOS] *= 4.0
    return model


def sources(n=9, seed=1, vocab=30):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 12, (n,), generator=g).tolist()
    return [source_ids(5, torch.randint(4, vocab, (k,), generator=g).tolist(), EOS) for k in lens]


def naive_greedy(model, src_ids, cfg: SearchConfig):
    src = torch.as_tensor(src_ids)[None]
    max_len = int(max_lengths(src, cfg, model.cfg.max_positions)[0])
    memory, out = model.encode(src), []
    for step in range(max_len + 1):
        lp = model.decode(torch.tensor([[BOS] + out]), memory, src)[0, -1].log_softmax(-1)
        lp[[PAD, BOS]] = -math.inf
        if step < cfg.min_len:
            lp[EOS] = -math.inf
        tok = EOS if step == max_len else int(lp.argmax())
        if tok == EOS:
            break
        out.append(tok)
    return out


def test_beam1_equals_naive_greedy():
    model, srcs, cfg = tiny_transformer(), sources(), SearchConfig(beam=1)
    got = translate(model, srcs, cfg, max_tokens=40)
    assert got == [naive_greedy(model, s, cfg) for s in srcs]
    assert len({len(h) for h in got}) > 1  # hypotheses really end at different steps


def test_last_position_only_matches_full_decode():
    model, src = tiny_transformer(), torch.as_tensor(sources(n=1)[0])[None]
    tgt = torch.tensor([[BOS, 7, 8, 9]])
    with torch.no_grad():
        memory = model.encode(src)
        full = model.decode(tgt, memory, src)
        last = model.decode(tgt, memory, src, last_only=True)
    assert last.shape == (1, 1, model.cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_beam_finds_best_where_greedy_fails():
    # Greedy takes A (0.5) but then only reaches 0.5*0.35*0.9; "B EOS" has 0.4*0.9.
    model = Bigram({BOS: {A: 0.5, B: 0.4, C: 0.1}, A: {C: 0.35, D: 0.25, E: 0.2, F: 0.2},
                    B: {EOS: 0.9, C: 0.1}, C: {EOS: 0.9, D: 0.1}, D: {EOS: 0.9, E: 0.1}})
    src = torch.tensor([[5, 6, EOS]])
    assert beam_search(model, src, SearchConfig(beam=1)) == [[A, C]]
    assert beam_search(model, src, SearchConfig(beam=2)) == [[B]]


def test_search_continues_while_live_beam_can_win():
    # At step 1 both top candidates end ("A EOS", "B EOS") but the live "A C" continues with
    # probability ~1 to a length where its normalised score beats both of them.
    chain = {C: {E: 1.0}, E: {F: 1.0}, F: {G: 1.0}, G: {EOS: 1.0}}
    model = Bigram({BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.7, C: 0.3}, B: {EOS: 0.75, D: 0.25}, D: {EOS: 1.0}, **chain})
    src = torch.tensor([[5, 6, EOS]])
    assert beam_search(model, src, SearchConfig(beam=2, lenpen=1.0)) == [[A, C, E, F, G]]
    # Without length normalisation nothing longer can beat "A EOS".
    assert beam_search(model, src, SearchConfig(beam=2, lenpen=0.0)) == [[A]]


def test_min_len_and_max_len():
    model = Bigram({BOS: {EOS: 0.9, A: 0.1}, A: {A: 1.0}})
    src = torch.tensor([[5, 6, EOS]])
    # EOS is banned at step 0, so the empty output is impossible.
    assert beam_search(model, src, SearchConfig(beam=3, max_len_a=0, max_len_b=4)) == [[A] * 4]
    assert beam_search(model, src, SearchConfig(beam=1, max_len_a=0, max_len_b=4)) == [[A] * 4]
    assert beam_search(model, src, SearchConfig(beam=2, max_len_a=0, max_len_b=4, min_len=0)) == [[]]


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_equals_one_by_one(beam):
    model, srcs, cfg = tiny_transformer(seed=2), sources(seed=3), SearchConfig(beam=beam)
    batched = translate(model, srcs, cfg, max_tokens=30)
    single = [beam_search(model, torch.as_tensor(s)[None], cfg)[0] for s in srcs]
    assert batched == single
    assert translate(model, srcs, cfg, max_tokens=30) == batched  # deterministic


@pytest.mark.parametrize("beam", [1, 5])
def test_order_restored(beam):
    srcs = sources(n=12, seed=4, vocab=50)
    hyps = translate(Copy(), srcs, SearchConfig(beam=beam), max_tokens=25)
    assert hyps == [list(s[1:-1]) for s in srcs]


def test_length_batches():
    lengths = [3, 10, 1, 7, 7, 2, 30]
    batches = length_batches(lengths, max_tokens=16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than max_tokens: alone, and first
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 16 or len(b) == 1
    with pytest.raises(ValueError, match="max_tokens"):
        length_batches(lengths, 0)


def test_length_batches_cap_sentences_too():
    lengths = [2] * 7 + [5]
    batches = length_batches(lengths, max_tokens=1000, max_sentences=3)
    assert [len(b) for b in batches] == [3, 3, 2] and batches[0][0] == 7  # longest first, still
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert length_batches(lengths, max_tokens=1000) == [[7, 0, 1, 2, 3, 4, 5, 6]]
    assert [len(b) for b in length_batches(lengths, max_tokens=8, max_sentences=3)] == [1, 3, 3, 1]
    with pytest.raises(ValueError, match="max_sentences"):
        length_batches(lengths, 10, 0)
    srcs = sources(n=9, seed=4, vocab=50)
    cfg = SearchConfig(beam=2)
    assert translate(Copy(), srcs, cfg, max_tokens=1000, max_sentences=2) == translate(Copy(), srcs, cfg, 1000)


def test_source_longer_than_max_positions_is_rejected():
    with pytest.raises(ValueError, match="max_positions"):
        translate(Copy(), [list(range(4, 4 + 70))])
