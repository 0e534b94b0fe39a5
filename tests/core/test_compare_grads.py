"""grads.compare_grads against a plain float64 computation of the same metrics."""

import math

import torch
from hypothesis import given, settings, strategies as st

from lossaudit.core.grads import compare_grads, dot, product_dot


def plain(reference, grads):
    r = torch.cat([reference[n].double().reshape(-1) for n, _ in grads])
    g = torch.cat([(torch.zeros_like(reference[n]) if t is None else t).double().reshape(-1) for n, t in grads])
    d = g - r
    return dict(rel_err=(d.norm() / r.norm()).item(),
                cosine=(g @ r / (g.norm() * r.norm())).item(),
                scale=(g @ r / (r @ r)).item(),
                max_abs=d.abs().max().item())


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
       # (a factor of 1e-45 would make a float32 ||g||² underflow: cosine NaN, not a case that matters)
       factor=st.one_of(st.just(0.0), st.floats(1e-3, 3.0), st.floats(-3.0, -1e-3)), noise=st.sampled_from([0.0, 1e-6, 1e-3, 1.0]), missing=st.booleans(),
       wide=st.booleans())
def test_metrics_match_a_float64_computation(seed, sizes, factor, noise, missing, wide):
    """A float64 reference (the float64 check) or a float32 one (a float32 model's), float32 grads."""
    gen = torch.Generator().manual_seed(seed)
    reference = {f"p{i}": torch.randn(n, generator=gen, dtype=torch.float64) for i, n in enumerate(sizes)}
    if not wide:
        reference = {n: r.float() for n, r in reference.items()}
    grads = [(n, (factor * r + noise * torch.randn(r.shape, generator=gen, dtype=torch.float64)).float())
             for n, r in reference.items()]
    if missing and len(grads) > 1:
        grads[0] = (grads[0][0], None)  # a parameter the path never touched counts as zero
    got, want = compare_grads(reference, grads), plain(reference, grads)
    tol = dict(rel_tol=1e-5, abs_tol=1e-7 if wide else 1e-6)
    assert math.isclose(got.rel_err, want["rel_err"], **tol)
    assert math.isclose(got.scale, want["scale"], **tol)
    assert math.isclose(got.max_abs, want["max_abs"], **tol)
    if not math.isnan(want["cosine"]):
        assert math.isclose(got.cosine, want["cosine"], **tol)


def test_cosine_near_one_keeps_its_precision():
    """Both in float32, as for a float32 model: 1 - cos is read from the exact difference, so a
    gradient within 1e-5 of the reference gets 1 - cos to a few digits, where float32 dot
    products would give 1 - cos = ±1e-7 of noise."""
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(200_000, generator=gen)
    g = r + 1e-5 * torch.randn(r.shape, generator=gen)
    want = plain({"w": r}, [("w", g)])
    gd, r = g.double(), r.double()
    d = gd - r
    # 1 - cos in float64, from the parts that stay small (no cancellation near 1)
    one_minus = ((d @ d) - ((gd @ gd - r @ r) / (gd.norm() + r.norm())) ** 2) / (2 * gd.norm() * r.norm())
    got = compare_grads({"w": r.float()}, [("w", g)])
    assert 1e-11 < one_minus.item() < 1e-9
    assert math.isclose(1 - got.cosine, one_minus.item(), rel_tol=1e-3)
    assert math.isclose(got.rel_err, want["rel_err"], rel_tol=1e-5)


def test_nonfinite_gradient_is_named_and_its_cosine_is_nan():
    reference = {"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(3, dtype=torch.float64)}
    got = compare_grads(reference, [("a", torch.ones(4)), ("b", torch.tensor([1.0, float("inf"), 1.0]))])
    assert got.nonfinite_param == "b" and math.isnan(got.cosine) and got.worst_param == "b"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5000), exponent=st.integers(-30, 10))
def test_bf16_product_dot_is_within_its_rounding_of_the_exact_dot(seed, n, exponent):
    """Each product rounded once to bf16 (unit roundoff 2^-8), the sum in float32: within
    (2^-8 + n 2^-24) x sum |x_i y_i| of the float64 dot, at any magnitude bf16 holds; and the
    widened dot (the CPU's) within float32's share of that."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 2.0 ** exponent).bfloat16()
    y = (torch.randn(n, generator=gen, dtype=torch.float64) + 0.5).bfloat16()
    exact = float(x.double() @ y.double())
    size = float((x.double() * y.double()).abs().sum())
    assert abs(float(product_dot(x, y)) - exact) <= (2 ** -8 + n * 2 ** -24) * size
    assert abs(float(dot(x, y)) - exact) <= n * 2 ** -23 * size
