import math

import numpy as np
import pytest

from megavac.data import TemperatureSampler, pack_by_length, sampling_probs

SIZES = [20000, 2000, 200, 50]


def lengths(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 40, size=n) for n in SIZES]


@pytest.mark.parametrize("T", [1.0, 5.0, math.inf])
def test_realised_ratios_match_temperature(T):
    p = sampling_probs(SIZES, T)
    q = np.asarray(SIZES, float) / sum(SIZES)
    expected = {1.0: q, 5.0: q ** 0.2 / (q ** 0.2).sum(), math.inf: np.full(4, 0.25)}[T]
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    s = TemperatureSampler(lengths(), p, max_tokens=400, seed=3)
    for _ in range(3000):
        next(s)
    np.testing.assert_allclose(s.realised_ratios(), p, atol=0.01)


def test_explicit_weights_and_bad_values():
    np.testing.assert_allclose(sampling_probs(SIZES, 5.0, [1, 1, 2, 0]), [0.25, 0.25, 0.5, 0])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling_probs(SIZES, 0.0)
    with pytest.raises(ValueError, match=r"\[1.0, -1.0\]"):
        sampling_probs([5, 5], 1.0, [1, -1])


def test_batches_respect_budget_and_are_grouped_by_language():
    s = TemperatureSampler(lengths(), sampling_probs(SIZES, 5.0), max_tokens=300, seed=1)
    L = lengths()
    for _ in range(200):
        batch = next(s)
        assert max(L[k][i] for k, i in batch) * len(batch) <= 300
    assert sum(map(len, pack_by_length(list(range(9)), np.arange(9), 10))) == 9


def test_deterministic_and_disjoint_across_ranks():
    p = sampling_probs(SIZES, 1.0)
    runs = [[next(s) for _ in range(50)] for s in
            (TemperatureSampler(lengths(), p, 300, seed=5, rank=r, world=2) for r in (0, 1, 0))]
    assert runs[0] == runs[2]
    seen0 = {x for b in runs[0] for x in b if x[0] == 0}  # task 0 never wraps an epoch in 50 batches
    seen1 = {x for b in runs[1] for x in b if x[0] == 0}
    assert seen0 and seen1 and not seen0 & seen1


def test_resume_mid_pool_gives_the_same_stream():
    p = sampling_probs(SIZES, 5.0)
    a = TemperatureSampler(lengths(), p, 300, seed=9, rank=1, world=2, pool_batches=8)
    first = [next(a) for _ in range(13)]  # 13 is mid-pool (8 per rank per pool)
    state = a.state_dict()
    rest = [next(a) for _ in range(30)]
    b = TemperatureSampler(lengths(), p, 300, seed=9, rank=1, world=2, pool_batches=8)
    b.load_state_dict(state)
    assert [next(b) for _ in range(30)] == rest
    assert first
    with pytest.raises(ValueError, match="world=4"):
        TemperatureSampler(lengths(), p, 300, seed=9, world=4).load_state_dict(state)


def test_epochs_cover_every_example_of_a_task():
    s = TemperatureSampler([np.full(50, 5)], np.ones(1), max_tokens=50, seed=0, pool_batches=1)
    drawn = [i for _ in range(10) for _, i in next(s)]  # 10 rows per batch -> 100 = two epochs
    assert sorted(drawn[:50]) == list(range(50)) and sorted(drawn[50:]) == list(range(50))


def test_langs_per_batch_limits_languages_per_batch():
    p = sampling_probs(SIZES, math.inf)
    s = TemperatureSampler(lengths(), p, 300, seed=2, pool_batches=1, langs_per_batch=2)
    seen = set()
    for _ in range(200):
        langs = {k for k, _ in next(s)}
        assert len(langs) <= 2
        seen |= langs
    assert seen == {0, 1, 2, 3}  # the subset is redrawn every pool
    with pytest.raises(ValueError, match="langs_per_batch=5"):
        TemperatureSampler(lengths(), p, 300, seed=2, langs_per_batch=5)


def test_dataset_selects_tasks_in_the_given_order_and_names_unknown_ones(small_synthetic):
    from megavac.data import MultilingualDataset

    names = MultilingualDataset(small_synthetic, "dev").names
    assert len(names) == 6
    picked = [names[3], names[0]]
    for tasks in (picked, ",".join(picked), f" {picked[0]} , {picked[1]},"):  # list, or --langs as typed
        ds = MultilingualDataset(small_synthetic, "dev", tasks)
        assert ds.names == picked and [t["name"] for t in ds.langs] == picked  # order = language index k
    with pytest.raises(ValueError, match=rf"unknown language\(s\) \['en-zz'\]; {small_synthetic} has \[.*{names[0]}"):
        MultilingualDataset(small_synthetic, "dev", [names[0], "en-zz"])
    with pytest.raises(ValueError, match="selected more than once"):
        MultilingualDataset(small_synthetic, "dev", [names[0], names[0]])


def test_lang_affine_batches_hold_one_language_within_budget():
    L = lengths()
    s = TemperatureSampler(L, sampling_probs(SIZES, 5.0), max_tokens=400, seed=3, lang_affine=True)
    batches = [next(s) for _ in range(300)]
    single = sum(len({k for k, _ in b}) == 1 for b in batches)
    assert single >= 0.9 * len(batches)  # mixed pools (the default) hold one language in ~1% at T=5
    assert all(max(L[k][i] for k, i in b) * len(b) <= 400 for b in batches)


def test_lang_affine_realised_ratios_match_probs():
    p = sampling_probs(SIZES, 5.0)
    s = TemperatureSampler(lengths(), p, max_tokens=400, seed=3, lang_affine=True)
    base = TemperatureSampler(lengths(), p, max_tokens=400, seed=3)
    next(s), next(base)  # same draws, only packed differently: the first pools hold the same items
    assert sorted(x for b in s._pool for x in b) == sorted(x for b in base._pool for x in b)
    for _ in range(3000):
        next(s)
    np.testing.assert_allclose(s.realised_ratios(), p, atol=0.01)


def test_lang_affine_deterministic_and_disjoint_across_ranks():
    p = sampling_probs(SIZES, 1.0)
    runs = [[next(s) for _ in range(50)] for s in
            (TemperatureSampler(lengths(), p, 300, seed=5, rank=r, world=2, lang_affine=True) for r in (0, 1, 0))]
    assert runs[0] == runs[2]
    seen0 = {x for b in runs[0] for x in b if x[0] == 0}
    seen1 = {x for b in runs[1] for x in b if x[0] == 0}
    assert seen0 and seen1 and not seen0 & seen1


def test_lang_affine_resume_mid_pool_and_mismatch():
    p = sampling_probs(SIZES, 5.0)
    a = TemperatureSampler(lengths(), p, 300, seed=9, rank=1, world=2, pool_batches=8, lang_affine=True)
    [next(a) for _ in range(13)]  # mid-pool
    state = a.state_dict()
    assert state["lang_affine"] is True
    rest = [next(a) for _ in range(30)]
    b = TemperatureSampler(lengths(), p, 300, seed=9, rank=1, world=2, pool_batches=8, lang_affine=True)
    b.load_state_dict(state)
    assert [next(b) for _ in range(30)] == rest
    with pytest.raises(ValueError, match="lang_affine=True.*lang_affine=False"):
        TemperatureSampler(lengths(), p, 300, seed=9, rank=1, world=2, pool_batches=8).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "lang_affine"}  # saved before the option: counts as False
    with pytest.raises(ValueError, match="lang_affine=False.*lang_affine=True"):
        b.load_state_dict(old)
    TemperatureSampler(lengths(), p, 300, seed=9, rank=1, world=2, pool_batches=8).load_state_dict(old)


def test_lang_affine_off_is_the_default_stream():
    p = sampling_probs(SIZES, 5.0)
    a = TemperatureSampler(lengths(), p, 300, seed=4, world=2, pool_batches=8)
    b = TemperatureSampler(lengths(), p, 300, seed=4, world=2, pool_batches=8, lang_affine=False)
    c = TemperatureSampler(lengths(), p, 300, seed=4, world=2, pool_batches=8, lang_affine=True)
    streams = [[next(s) for _ in range(40)] for s in (a, b, c)]
    assert streams[0] == streams[1] and streams[0] != streams[2]
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


@pytest.mark.parametrize("lang_affine", [False, True])
def test_resharded_resume_deals_the_rest_of_the_pool_without_repeats(lang_affine):
    """2 ranks → 1 rank → 2 ranks mid-pool: every batch of a pool is taken at most once, in pool order,
    and only fewer than `world` batches per change (those that do not fill a last round) are skipped."""
    p = sampling_probs(SIZES, 5.0)
    make = lambda rank, world: TemperatureSampler(lengths(), p, 300, seed=4, rank=rank, world=world,
                                                  pool_batches=8, lang_affine=lang_affine)
    two = [make(r, 2) for r in range(2)]
    taken = [b for _ in range(5) for s in two for b in [next(s)]]  # 5 rounds: mid-pool (8 rounds per pool)
    pool = two[0]._pool  # the whole pool both ranks drew (identical on each)
    assert taken == pool[:10]
    one = make(0, 1)
    dropped = one.load_resharded([s.state_dict() for s in two])
    assert dropped == 0 and [next(one) for _ in range(3)] == pool[10:13]
    assert one.counts.sum() == sum(len(b) for b in pool[:13])
    again = [make(r, 2) for r in range(2)]
    dropped = [s.load_resharded([one.state_dict()]) for s in again]
    rounds, cut = divmod(len(pool) - 13, 2)
    assert rounds >= 1 and dropped == [cut, cut]
    assert [next(s) for _ in range(rounds) for s in again] == pool[13:13 + 2 * rounds]
    assert again[0].counts.sum() + again[1].counts.sum() == sum(len(b) for b in pool[:13 + 2 * rounds])
    assert again[1].counts.sum() == sum(len(b) for b in pool[14:13 + 2 * rounds:2])  # rank 1: its own only
    # The next pool is a fresh draw for the new world, and each rank's state resumes exactly from there.
    nxt = [next(again[0]), next(again[1])]
    assert nxt == again[0]._pool[:2] and again[0]._pool == again[1]._pool
    twin = make(0, 2)
    twin.load_state_dict(again[0].state_dict())
    assert [next(twin) for _ in range(3)] == [next(again[0]) for _ in range(3)]


def test_resharded_resume_needs_every_rank_and_the_same_stream():
    p = sampling_probs(SIZES, 5.0)
    two = [TemperatureSampler(lengths(), p, 300, seed=4, rank=r, world=2) for r in range(2)]
    for s in two:
        next(s)
    one = TemperatureSampler(lengths(), p, 300, seed=4)
    with pytest.raises(ValueError, match="each of the 2 data-parallel ranks"):
        one.load_resharded([two[0].state_dict()])
    other = TemperatureSampler(lengths(), p, 300, seed=5)
    with pytest.raises(ValueError, match="seed=4"):
        other.load_resharded([s.state_dict() for s in two])
