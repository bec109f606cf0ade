"""Gradient methods on Gram matrices: exactness against literal vector implementations, properties,
degenerate inputs, state, golden values. Run with ``python -m pytest tests/test_methods.py``."""
import math

import pytest
import torch

import reference_methods as ref
from megavac.methods import METHODS, StepContext, build_method, method_options
from megavac.methods.pcgrad import TARGET_EPS, VANISHED

DIMS = (7, 3, 12)  # groups of different sizes; 3 dims < K makes conflicts common


def problem(K, seed, absent=True, zero=True, base=None, noise=1.0):
    """Per-group gradients [K, D_g] (list) and the present mask.

    Language K−1 is absent (zero everywhere, present False); language 0 has a zero gradient in group 1.
    ``base`` (list of [K, D_g]) makes gradients correlated across steps, so EMA targets mean something.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g, d in enumerate(DIMS):
        v = noise * torch.randn(K, d, generator=gen, dtype=torch.float64)
        if base is not None:
            v = v + base[g]
        groups.append(v)
    present = torch.ones(K, dtype=torch.bool)
    if absent:
        present[K - 1] = False
        for v in groups:
            v[K - 1] = 0
    if zero:
        groups[1][0] = 0
    return groups, present


# Options that make every method runnable on a bare Gram: GradVac's default (LRL_only) needs the languages'
# training-set sizes, which these tests do not have; CATS updates α every step.
OPTS = {"gradvac": {"langs": "all"}, "cats": {"warm_interval": 1}}


def gram_of(groups):
    return torch.stack([v @ v.T for v in groups])


def combine(w, groups):
    return [w[g] @ v for g, v in enumerate(groups)]


def ctx(step, present, gen, losses=None):
    return StepContext(step=step, present=present, losses=losses, generator=gen)


def assert_updates_close(mine, theirs, rtol=1e-10):
    for a, b in zip(mine, theirs, strict=True):
        scale = max(float(b.norm()), 1e-300)
        assert float((a - b).norm()) <= rtol * scale, (a, b)


def assert_ema_close(ema, nested, atol=1e-12):
    assert torch.allclose(ema, torch.tensor(nested, dtype=torch.float64), rtol=0, atol=atol)


# ------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("order", ["shared", "independent"])
@pytest.mark.parametrize("K", [3, 4, 5, 6])
def test_pcgrad_matches_literal(K, order):
    m = build_method("pcgrad", K, order=order)
    gen = torch.Generator().manual_seed(K)
    for step in range(3):
        groups, present = problem(K, 100 * K + step)
        w = m.weights(gram_of(groups), ctx(step, present, gen))
        assert_updates_close(combine(w, groups), ref.pcgrad(groups, present, m.last_order))


def _gradvac_run(K, steps, order="shared", **options):
    m = build_method("gradvac", K, order=order, **{"langs": "all", **options})
    gen = torch.Generator().manual_seed(7)
    ema = [[[0.0] * K for _ in range(K)] for _ in DIMS]
    base, _ = problem(K, 999, absent=False, zero=False)
    for step in range(steps):
        groups, present = problem(K, 10 * K + step, base=base, noise=0.7)
        w = m.weights(gram_of(groups), ctx(step, present, gen))
        subset = m.subset.tolist()
        theirs = ref.gradvac(groups, present, m.last_order, ema, options.get("beta", 1e-2), subset,
                             options.get("fixed_target"))
        assert_updates_close(combine(w, groups), theirs)
    return m, ema


@pytest.mark.parametrize("order", ["shared", "independent"])
@pytest.mark.parametrize("K", [3, 4, 5, 6])
def test_gradvac_ema_matches_literal_over_steps(K, order):
    # β = 0.3 so the targets move visibly within a few steps and the comparisons depend on them.
    m, ema = _gradvac_run(K, 6, order=order, beta=0.3)
    assert_ema_close(m.ema, ema)
    assert float(m.ema.abs().max()) > 0.05  # the EMA really evolved


def test_gradvac_lrl_subset_matches_literal():
    sizes = [5000, 90, 800000, 60, 100]
    m, ema = _gradvac_run(5, 4, beta=0.2, langs="lrl", sizes=sizes, size_threshold=1000)
    assert m.subset.tolist() == [False, True, False, True, True]
    assert_ema_close(m.ema, ema)
    # Rows outside the subset are never compared: their EMA rows stay at the initial 0.
    assert float(m.ema[:, [0, 2]].abs().max()) == 0.0


def test_gradvac_hrl_and_fixed_target_match_literal():
    sizes = [5000, 90, 800000, 60, 100]
    _gradvac_run(5, 3, beta=0.2, langs="hrl", sizes=sizes, size_threshold=1000)
    m, _ = _gradvac_run(5, 3, fixed_target=0.5)
    assert m.ema is None  # fixed target: no EMA kept


@pytest.mark.parametrize("variant", ["pairwise", "fw"])
@pytest.mark.parametrize("K", [3, 4, 6])
def test_mgda_matches_literal(K, variant):
    # tol = 0 and a fixed iteration count: with tol > 0 two exact implementations may stop one iteration
    # apart when the gap lands next to the threshold (the result then differs by about tol, not 1e-10).
    gen = torch.Generator()
    for iters in (3, 60):
        m = build_method("mgda", K, variant=variant, max_iter=iters, tol=0.0)
        for step in range(2):
            groups, present = problem(K, 31 * K + step)
            w = m.weights(gram_of(groups), ctx(step, present, gen))
            theirs = ref.mgda(groups, present, max_iter=iters, tol=0.0, variant=variant)
            assert_updates_close(combine(w, groups), theirs)


@pytest.mark.parametrize("alpha_step", ["implicit", "explicit"])
def test_cats_matches_literal_over_steps(alpha_step):
    K = 5
    opts = dict(alpha_lr=0.1, lambda_lr=0.5, epsilon=0.05, curvature_budget=0.5, warm_steps=6,
                warm_interval=2, interval=3, alpha_step=alpha_step)
    m = build_method("cats", K, **opts)
    r = ref.CATSRef(K, alpha_lr=0.1, lambda_lr=0.5, epsilon=0.05, curvature_budget=0.5, warm_steps=6,
                    warm_interval=2, interval=3, alpha_step=alpha_step)
    gen = torch.Generator()
    for step in range(12):
        groups, present = problem(K, 500 + step, noise=0.3)
        w = m.weights(gram_of(groups), ctx(step, present, gen))
        assert_updates_close(combine(w, groups), r.step(groups, present, step))
        assert torch.allclose(m.alpha, torch.tensor(r.alpha, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        assert m.lambda_c == pytest.approx(r.lc, rel=1e-12) and m.lambda_s == pytest.approx(r.ls, rel=1e-12)
        assert torch.allclose(m.lambda_n, torch.tensor(r.ln, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert m.updates == 5  # steps 1, 3, 5 (M = 2 while step < 6), then 8, 11 (M = 3)
    assert not torch.equal(m.alpha, torch.ones(K, dtype=torch.float64))


def test_gradnorm_matches_literal_over_steps():
    K = 5
    m = build_method("gradnorm", K, alpha=1.5, lr=0.05, group=-1)
    r = ref.GradNormRef(K, alpha=1.5, lr=0.05, group=-1)
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        groups, present = problem(K, 700 + step)
        if step == 0:
            present[2] = False  # first seen later: its L_i(0) comes from a later step
            for v in groups:
                v[2] = 0
        losses = torch.rand(K, generator=gen, dtype=torch.float64) * 2 + 0.5
        losses[~present] = 0
        w = m.weights(gram_of(groups), ctx(step, present, gen, losses))
        assert_updates_close(combine(w, groups), r.step(groups, present, losses))
        assert torch.allclose(m.w, torch.tensor(r.w, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(m.w.sum()) == pytest.approx(K, rel=1e-12)  # renormalised to the number of languages
    assert float((m.w - 1).abs().max()) > 0.05


# ------------------------------------------------------------------------------------ properties

def test_pcgrad_last_pair_never_conflicts():
    # What holds exactly: right after row i is processed against j, g'_i·g_j ≥ 0 (a conflict is projected
    # to exactly 0). Later projections may re-create a conflict with earlier j's, so at the end only the
    # LAST j of each row's order is guaranteed non-conflicting.
    K = 6
    m = build_method("pcgrad", K)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        groups, present = problem(K, step, absent=False, zero=False)
        m.weights(gram_of(groups), ctx(step, present, gen))
        for v in groups:
            for i in range(K):
                gi = v[i].clone()
                for j in m.last_order[i].tolist():  # replay row i literally, keep the final g'_i
                    d = float(gi @ v[j])
                    if d < 0:
                        gi = gi - d / float(v[j] @ v[j]) * v[j]
                last = int(m.last_order[i, -1])
                assert float(gi @ v[last]) >= -1e-12 * float(gi.norm() * v[last].norm())


def test_gradvac_reaches_target_on_last_altered_pair():
    # After an alteration against j, cos(g'_i, g_j) equals the (clamped) target exactly (Eq. 2); for the
    # last j of a row nothing alters g'_i afterwards, so the final cosine is ≥ the target.
    K, target = 5, 0.4
    groups, present = problem(K, 3, absent=False, zero=False)
    m = build_method("gradvac", K, fixed_target=target, langs="all")
    m.weights(gram_of(groups), ctx(0, present, torch.Generator().manual_seed(2)))
    for v in groups:
        for i in range(K):
            gi = v[i].clone()
            for j in m.last_order[i].tolist():
                phi = float(gi @ v[j] / (gi.norm() * v[j].norm()))
                if phi < target:  # Eq. 2
                    s_phi, s_tgt = math.sqrt(1 - phi ** 2), math.sqrt(1 - target ** 2)
                    gi = gi + gi.norm() * (target * s_phi - phi * s_tgt) / (v[j].norm() * s_tgt) * v[j]
                    assert float(gi @ v[j] / (gi.norm() * v[j].norm())) == pytest.approx(target, abs=1e-12)
            last = int(m.last_order[i, -1])
            assert float(gi @ v[last] / (gi.norm() * v[last].norm())) >= target - 1e-12


@pytest.mark.parametrize("order", ["shared", "independent"])
def test_gradvac_fixed_target_zero_is_pcgrad(order):
    K = 6
    a = build_method("gradvac", K, fixed_target=0.0, order=order, langs="all")
    b = build_method("pcgrad", K, order=order)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(3):
        groups, present = problem(K, 40 + step)
        gram = gram_of(groups)
        wa, wb = a.weights(gram, ctx(step, present, ga)), b.weights(gram, ctx(step, present, gb))
        assert torch.equal(a.last_order, b.last_order)
        assert torch.allclose(wa, wb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,options", [("pcgrad", {}), ("gradvac", {"beta": 0.3, "langs": "all"}), ("mgda", {}),
                                          ("pcgrad", {"order": "independent"})])
def test_weights_invariant_to_gradient_scale(name, options):
    K = 5
    a, b = build_method(name, K, **options), build_method(name, K, **options)
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for step, c in enumerate([1e-6, 3.0, 1e5]):
        groups, present = problem(K, 60 + step)
        gram = gram_of(groups)
        wa = a.weights(gram, ctx(step, present, ga))
        wb = b.weights(gram * c * c, ctx(step, present, gb))  # gradients × c
        assert torch.allclose(wa, wb, rtol=1e-9, atol=1e-12)


def test_mgda_is_min_norm_and_monolithic_when_gradients_agree():
    # Plain Frank-Wolfe converges fast when the optimum is interior (many dims, as in a real model);
    # in few dims with a sparse optimum it zig-zags (O(1/t)), so the KKT check uses 40-dim gradients.
    K = 5
    gen = torch.Generator().manual_seed(77)
    gram = gram_of([torch.randn(K, 40, generator=gen, dtype=torch.float64) + s for s in (0.0, 0.5, -0.3)])
    present = torch.ones(K, dtype=torch.bool)
    w = build_method("mgda", K, tol=1e-10).weights(gram, ctx(0, present, gen))
    assert torch.all(w >= 0) and torch.allclose(w.sum(1), torch.full((3,), float(K), dtype=torch.float64))
    # KKT of min ‖Σγg‖² on the simplex: θ·g_k ≥ ‖θ‖² for all k, equality where γ_k > 0.
    gamma = w / K
    u = torch.einsum("gij,gj->gi", gram, gamma)
    v = (gamma * u).sum(1, keepdim=True)
    assert torch.all(u >= v * (1 - 1e-6))
    assert torch.all(((u - v).abs() <= 1e-6 * v) | (gamma < 1e-6))
    same = torch.ones(1, K, 1, dtype=torch.float64) * torch.randn(1, 1, 4, dtype=torch.float64)
    w = build_method("mgda", K).weights(gram_of([same[0]]), ctx(0, present, torch.Generator()))
    assert torch.allclose(w, torch.ones(1, K, dtype=torch.float64))


def test_monolithic_is_ones_and_cheap():
    K = 4
    m = build_method("monolithic", K)
    groups, present = problem(K, 1)
    assert not m.needs_gram(0)
    assert torch.equal(m.loss_weights(), torch.ones(K, dtype=torch.float64))
    assert torch.equal(m.weights(gram_of(groups), ctx(0, present, torch.Generator())),
                       torch.ones(3, K, dtype=torch.float64))


def test_cats_schedule_and_cheap_path():
    m = build_method("cats", 4, warm_steps=100, warm_interval=10, interval=1000)
    meta = [s for s in range(2100) if m.needs_gram(s)]
    assert meta == list(range(9, 100, 10)) + [999, 1999]
    groups, present = problem(4, 2)
    w = m.weights(gram_of(groups), ctx(0, present, torch.Generator()))  # not a meta step: α, no update
    assert torch.equal(w, torch.ones(3, 4, dtype=torch.float64)) and m.updates == 0
    assert METHODS["cats"].default_langs_per_batch == 8 and METHODS["pcgrad"].default_langs_per_batch is None


def test_cats_constraints_improve_on_synthetic_problem():
    # Fixed conflicting Gram, a meta step every step, a reachable curvature budget: the curvature drops
    # below that of plain training, Σα approaches N and α stays above the floor ε.
    K, eps = 6, 0.02
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(K, 9, generator=gen, dtype=torch.float64) + 0.4
    gram = (v @ v.T)[None]
    gram = gram / gram.sum() * 2.0  # plain-training curvature 1ᵀG1 = 2
    m = build_method("cats", K, alpha_lr=0.1, epsilon=eps, curvature_budget=1.5, warm_interval=1)
    present = torch.ones(K, dtype=torch.bool)
    curv, gaps = [], []
    for step in range(1500):
        m.weights(gram, ctx(step, present, gen))
        curv.append(m.curvature(gram))
        gaps.append(abs(float(m.alpha.sum()) - K))
    assert curv[-1] < 0.8 * 2.0 and curv[-1] <= 1.5 + 1e-3  # curvature decreased, within budget
    assert gaps[-1] < 0.5 * max(gaps[:20]) and gaps[-1] < 0.1  # Σα → N
    assert float(m.alpha.min()) >= eps - 1e-3
    # An unreachable budget (the default ε_c = ε) makes λ_c grow forever; the implicit step stays finite.
    m = build_method("cats", K, alpha_lr=1.0, warm_interval=1)
    for step in range(3000):
        m.weights(gram * 50, ctx(step, present, gen))
    assert torch.isfinite(m.alpha).all() and m.lambda_c > 100 and m.curvature(gram) < 2.0


def test_gradnorm_balances_weighted_gradient_norms():
    # Equal training rates (constant losses) and α irrelevant: w_i √G_ii is driven towards its mean.
    K = 4
    norms = torch.tensor([0.2, 1.0, 3.0, 0.5], dtype=torch.float64)
    gram = torch.diag(norms ** 2)[None].expand(2, K, K).clone()
    m = build_method("gradnorm", K, lr=0.01)
    present, losses = torch.ones(K, dtype=torch.bool), torch.ones(K, dtype=torch.float64)
    spread = lambda: float((m.w * norms).std() / (m.w * norms).mean())
    before = spread()
    for step in range(400):
        m.weights(gram, ctx(step, present, torch.Generator(), losses))
    assert spread() < 0.1 * before
    assert float(m.w.sum()) == pytest.approx(K)


# ------------------------------------------------------------------------------ degenerate inputs

def degenerate_grams(K):
    v = torch.randn(K, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rank1 = torch.outer(torch.linspace(-2, 3, K, dtype=torch.float64), v[0])
    same = v[:1].expand(K, 5)
    anti = torch.cat([v[:1], -v[:1]]).repeat(K, 1)[:K]
    return torch.stack([torch.zeros(K, K, dtype=torch.float64), rank1 @ rank1.T, same @ same.T,
                        anti @ anti.T])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_degenerate_grams_give_finite_weights(name):
    K = 4
    m = build_method(name, K, **OPTS.get(name, {}))
    gram = degenerate_grams(K)
    present = torch.ones(K, dtype=torch.bool)
    losses = torch.ones(K, dtype=torch.float64)
    for step in range(3):
        w = m.weights(gram, ctx(step, present, torch.Generator(), losses))
        assert w.shape == (4, K) and torch.isfinite(w).all()
    assert m.skipped == 0
    for k, v in m.state_dict().items():
        assert not isinstance(v, torch.Tensor) or torch.isfinite(v).all(), k


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_non_finite_gram_is_skipped_and_state_untouched(name, bad):
    K = 4
    m = build_method(name, K, **OPTS.get(name, {}))
    present, losses = torch.ones(K, dtype=torch.bool), torch.linspace(1, 2, K, dtype=torch.float64)
    groups, _ = problem(K, 8, absent=False)
    gram = gram_of(groups)
    m.weights(gram, ctx(0, present, torch.Generator(), losses))  # some state first
    before = m.state_dict()
    bad_gram = gram.clone()
    bad_gram[1, 0, 2] = bad
    w = m.weights(bad_gram, ctx(1, present, torch.Generator(), losses))
    assert torch.isfinite(w).all() and torch.equal(w, m.loss_weights().expand(3, K))
    after = m.state_dict()
    assert after.pop("skipped") == before.pop("skipped") + 1 == 1
    for k in before:
        assert _same(before[k], after[k]), k


def _same(a, b):
    if isinstance(a, torch.Tensor):  # NaN marks "not seen yet" (GradNorm's initial losses)
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return a == b


def test_zero_and_absent_languages_are_left_out():
    K = 5
    groups, present = problem(K, 4)
    gram = gram_of(groups)
    for name in ("pcgrad", "gradvac", "mgda"):
        m = build_method(name, K, **OPTS.get(name, {}))
        w = m.weights(gram, ctx(0, present, torch.Generator()))
        assert torch.isfinite(w).all()
        if name != "mgda":  # C row of an absent language stays e_i; nobody adds multiples of zero vectors
            assert float(w[:, K - 1].sub(1).abs().max()) == 0 and float(w[1, 0]) == 1.0
        if name == "gradvac":  # no EMA entry involving the absent or the zero language moved
            assert float(m.ema[:, K - 1].abs().max()) == 0 and float(m.ema[:, :, K - 1].abs().max()) == 0
            assert float(m.ema[1, 0].abs().max()) == 0 and float(m.ema[1, :, 0].abs().max()) == 0


def test_gradvac_targets_at_plus_minus_one_are_clamped():
    K = 4
    groups, present = problem(K, 6, absent=False, zero=False)
    gram = gram_of(groups)
    for target in (1.0, -1.0, 1.5):  # Eq. 2 divides by √(1 − φ̂²): a fixed target of ±1 is refused by name
        with pytest.raises(ValueError, match=f"fixed_target.*{target}"):
            build_method("gradvac", K, fixed_target=target, langs="all")
    # An EMA target can still approach ±1 (it averages cosines): clamped where used.
    m = build_method("gradvac", K, langs="all")
    m.load_state_dict({"skipped": 0, "ema": torch.ones(3, K, K, dtype=torch.float64)})
    w = m.weights(gram, ctx(0, present, torch.Generator()))
    # Target 1 − 1e-6: reaching cosine 0.999999 with a₁ = 1 takes a coefficient up to ≈ 1/√(2·1e-6) ≈ 707
    # times ‖g'_i‖/‖g_j‖, compounding over a row's pairs: huge weights (that is what the target asks
    # for), but finite; the literal reference (same clamp) agrees.
    assert torch.isfinite(w).all()
    ema = [[[1.0] * K for _ in range(K)] for _ in DIMS]
    theirs = ref.gradvac(groups, present, m.last_order, ema, 1e-2, [True] * K)
    assert_updates_close(combine(w, groups), theirs, rtol=1e-6)  # conditioning ~ 707² here
    assert_ema_close(m.ema, ema)
    assert TARGET_EPS == ref.TARGET_EPS and VANISHED == ref.VANISHED  # the spec both sides implement


@pytest.mark.parametrize("order", ["shared", "independent"])
@pytest.mark.parametrize("name", ["gradvac", "pcgrad", "gradvac_fixed"])
def test_anti_parallel_pairs_with_large_norms_stay_finite(name, order):
    # An exactly anti-parallel pair with ‖g‖ ~ 1e3–1e4: once g'_i is projected away its squared norm must be
    # 0, not −1e-9 (which made φ's rsqrt NaN and the EMA NaN forever). Many steps, EMA finite throughout,
    # no step counted as skipped, and the weights of the literal algorithm.
    K, D = 4, 16
    gen = torch.Generator().manual_seed(3)
    m = build_method(name.split("_")[0], K, order=order,
                     **({"langs": "all", **({"fixed_target": 0.5} if name == "gradvac_fixed" else {})}
                        if name.startswith("gradvac") else {}))
    rng = torch.Generator().manual_seed(5)
    for step in range(60):
        scale = 10.0 ** (3 + torch.rand(1, generator=rng).item())
        u = torch.randn(D, generator=rng, dtype=torch.float64)
        v = torch.randn(D, generator=rng, dtype=torch.float64)
        g = torch.stack([u, -u * (1 + step % 3), v, -v]) * scale  # pairs (0, 1) and (2, 3) exactly opposite
        gram = (g @ g.T)[None].expand(2, K, K).clone()
        w = m.weights(gram, ctx(step, torch.ones(K, dtype=torch.bool), gen))
        assert torch.isfinite(w).all(), (step, w)
        if name == "gradvac":
            assert torch.isfinite(m.ema).all(), step
            assert float(m.ema.abs().max()) <= 1.0
    assert m.skipped == 0


def test_altered_norm_cannot_go_negative():
    from megavac.methods.pcgrad import _altered_norm

    # g'_i = −g_j exactly, ‖g‖² = 1e8: adding a = 1 (PCGrad's projection) leaves the zero vector.
    n = torch.tensor([[1e8 * (1 + 3e-16)]], dtype=torch.float64)
    x = torch.tensor([[-1e8]], dtype=torch.float64)
    gjj = torch.tensor([[1e8]], dtype=torch.float64)
    a = -x / gjj
    assert float(n + 2 * a * x + a * a * gjj) != 0.0  # the expanded form is rounding noise of either sign
    assert float(_altered_norm(n, x, a, gjj)) >= 0.0
    assert float(_altered_norm(n, x, a, gjj)) <= 1e-7 * 1e8


# --------------------------------------------------------------------------------------- state

@pytest.mark.parametrize("name,options", [
    ("gradvac", {"beta": 0.3, "langs": "all"}), ("cats", {"warm_interval": 2}), ("gradnorm", {}), ("pcgrad", {}),
    ("mgda", {}), ("monolithic", {})])
def test_state_dict_round_trip_continues_identically(name, options):
    K = 5
    a = build_method(name, K, **options)
    gen = torch.Generator().manual_seed(11)
    seq = []
    for step in range(8):
        groups, present = problem(K, 900 + step)
        losses = torch.linspace(0.5, 1.5, K, dtype=torch.float64) * (1 + 0.1 * step)
        seq.append((gram_of(groups), present, losses))
    for step in range(4):
        a.weights(seq[step][0], ctx(step, seq[step][1], gen, seq[step][2]))
    a.weights(seq[0][0].clone().fill_(math.nan), ctx(4, seq[0][1], gen, seq[0][2]))  # one skip
    state = a.state_dict()
    b = build_method(name, K, **options)
    b.load_state_dict(state)
    assert b.skipped == a.skipped == 1
    ga, gb = torch.Generator(), torch.Generator()
    ga.set_state(gen.get_state())
    gb.set_state(gen.get_state())
    for step in range(5, 8):
        gram, present, losses = seq[step]
        wa = a.weights(gram, ctx(step, present, ga, losses))
        wb = b.weights(gram, ctx(step, present, gb, losses))
        assert torch.equal(wa, wb)
    for k, v in a.state_dict().items():
        assert _same(v, b.state_dict()[k]), k


def test_load_state_dict_rejects_bad_values():
    m = build_method("gradvac", 4, langs="all")
    with pytest.raises(ValueError, match="ema"):
        m.load_state_dict({"skipped": 0, "ema": torch.zeros(2, 3, 3)})
    with pytest.raises(ValueError, match="alpha"):
        build_method("cats", 4).load_state_dict({"skipped": 0, "lambda_c": 0.0})
    with pytest.raises(ValueError, match="skipped"):
        build_method("pcgrad", 4).load_state_dict({})


# ------------------------------------------------------------------------------ golden values

GOLDEN_GRAM = torch.tensor([[[4.0, -1.0, 0.5, 1.0], [-1.0, 2.0, -0.8, 0.3], [0.5, -0.8, 3.0, -1.2],
                             [1.0, 0.3, -1.2, 1.5]],
                            [[1.0, 0.2, -0.4, 0.0], [0.2, 2.5, 0.9, -0.7], [-0.4, 0.9, 1.2, 0.1],
                             [0.0, -0.7, 0.1, 0.8]]], dtype=torch.float64)
GOLDEN = {  # verified against tests/reference_methods.py (vectors = Cholesky factors of the Grams)
    "pcgrad": [[1.2166666666666668, 1.78, 1.6666666666666665, 1.7999999999999998],
               [1.4, 1.28, 1.3333333333333335, 1.875]],
    "gradvac": [[1.1281220672468673, 1.500375204328056, 1.3669848654591172, 1.4219836363313032],
                [1.2106271694104003, 1.1544471612709768, 1.1755226411753337, 1.4826473789718024]],
    "mgda": [[0.0, 0.9077362610630298, 1.3547280268232589, 1.7375357121137116],
             [1.204782112681949, 0.47465665928734546, 0.7482541167030784, 1.5723071113276275]],
}


def _golden(name):
    m = build_method(name, 4, **({"beta": 0.5, "langs": "all"} if name == "gradvac" else {}))
    gen = torch.Generator().manual_seed(1234)
    present = torch.ones(4, dtype=torch.bool)
    w = m.weights(GOLDEN_GRAM, ctx(0, present, gen))
    if name == "gradvac":  # second step: the EMA from the first one matters
        w = m.weights(GOLDEN_GRAM, ctx(1, present, gen))
    return m, w


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_weights(name):
    _, w = _golden(name)
    assert torch.allclose(w, torch.tensor(GOLDEN[name], dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_golden_cats_and_gradnorm_state():
    present = torch.ones(4, dtype=torch.bool)
    m = build_method("cats", 4, warm_interval=1, alpha_lr=0.1, epsilon=0.05, curvature_budget=2.0)
    for step in range(3):
        m.weights(GOLDEN_GRAM, ctx(step, present, torch.Generator()))
    expected = [0.04438893365568394, 0.14685228966716926, 0.20429893257949525, 0.3382256785863865]
    assert torch.allclose(m.alpha, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert m.lambda_c == pytest.approx(1.3185170150811478, rel=1e-12)
    assert m.lambda_s == pytest.approx(1.1069357494386096, rel=1e-12)
    g = build_method("gradnorm", 4, lr=0.1)
    for step, losses in enumerate([[2.0, 3.0, 1.0, 4.0], [1.5, 2.0, 0.9, 2.0], [1.0, 1.8, 0.8, 1.0]]):
        losses = torch.tensor(losses, dtype=torch.float64)
        g.weights(GOLDEN_GRAM, ctx(step, present, torch.Generator(), losses))
    expected = [1.0531387871246949, 0.803812748506158, 1.2772454798773754, 0.8658029844917716]
    assert torch.allclose(g.w, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


# ------------------------------------------------------------------------------ API and errors

def test_registry_and_user_errors():
    assert set(METHODS) == {"monolithic", "pcgrad", "gradvac", "cats", "mgda", "gradnorm"}
    assert method_options("gradvac")["beta"] == 1e-2 and method_options("gradnorm") == {"alpha": 1.5, "lr": 0.025}
    with pytest.raises(ValueError, match="'sgd'"):
        build_method("sgd", 4)
    with pytest.raises(ValueError, match="betta"):
        build_method("gradvac", 4, betta=0.1)
    with pytest.raises(ValueError, match="'median'"):
        build_method("gradvac", 4, langs="median")
    with pytest.raises(ValueError, match="sizes"):
        build_method("gradvac", 4, langs="lrl")
    with pytest.raises(ValueError, match="1.5"):
        build_method("gradvac", 4, fixed_target=1.5)
    with pytest.raises(ValueError, match="'random'"):
        build_method("pcgrad", 4, order="random")
    with pytest.raises(ValueError, match="-0.1"):
        build_method("cats", 4, alpha_lr=-0.1)
    m = build_method("pcgrad", 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        m.weights(torch.zeros(2, 3, 3), ctx(0, torch.ones(4, dtype=torch.bool), torch.Generator()))
    with pytest.raises(ValueError, match="present"):
        m.weights(torch.zeros(2, 4, 4), ctx(0, torch.ones(4), torch.Generator()))
    g = build_method("gradnorm", 4)
    with pytest.raises(ValueError, match="losses"):
        g.weights(torch.eye(4)[None], ctx(0, torch.ones(4, dtype=torch.bool), torch.Generator()))
    with pytest.raises(ValueError, match="group=5"):
        build_method("gradnorm", 4, group=5).weights(
            torch.eye(4)[None], ctx(0, torch.ones(4, dtype=torch.bool), torch.Generator(), torch.ones(4)))
