"""The merge math on small tensors: worked numbers, and properties every method must have."""

import math

import pytest
import torch

from safemerge import METHODS
from safemerge.errors import ConfigError
from safemerge.merging import methods
from safemerge.merging.methods import get, register, trim

A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
F = torch.tensor([[3.0, 2.0, 1.0], [0.0, -1.0, 2.0]])


def draws(n, shape, seed=0):
    return [torch.rand(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def call(name, base, tuned, **params):
    m = METHODS[name]
    if "draws" in m.parameters:
        params.setdefault("draws", draws(len(tuned), base.shape))
    return m(base, tuned, **params)


# --- worked numbers --------------------------------------------------------------------


def test_linear_at_0_3():
    expected = torch.tensor([[1.6, 2.0, 2.4], [2.8, 3.2, 4.8]])
    assert torch.allclose(call("linear", A, [F], lam=0.3), expected)


def test_linear_averages_several_fine_tunes():
    g = torch.tensor([[1.0, 0.0, 1.0], [2.0, 3.0, 0.0]])
    expected = 0.5 * A + 0.5 * (F + g) / 2
    assert torch.allclose(call("linear", A, [F, g], lam=0.5), expected)


def test_task_arithmetic():
    g = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    expected = A + 0.4 * ((F - A) + (g - A)) / 2
    assert torch.allclose(call("task_arithmetic", A, [F, g], lam=0.4), expected)


def test_slerp_endpoints_and_right_angle():
    assert torch.allclose(call("slerp", A, [F], lam=0.0), A)
    assert torch.allclose(call("slerp", A, [F], lam=1.0), F)
    a, f = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = math.sqrt(0.5)
    assert torch.allclose(call("slerp", a, [f], lam=0.5), torch.tensor([half, half]))
    # unequal norms: coefficients apply to the original tensors
    assert torch.allclose(call("slerp", 2 * a, [3 * f], lam=0.5), torch.tensor([2 * half, 3 * half]))


def test_slerp_falls_back_to_linear_when_parallel_or_zero():
    assert torch.allclose(call("slerp", A, [2 * A], lam=0.25), 1.25 * A)
    zero = torch.zeros_like(A)
    assert torch.allclose(call("slerp", zero, [F], lam=0.25), 0.25 * F)


D1 = torch.tensor([3.0, -2.0, 0.5, 0.0, 1.0, -4.0])
D2 = torch.tensor([-1.0, -3.0, 2.0, 1.0, 1.0, 4.0])
BASE6 = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])


def test_ties_sign_election_without_trim():
    # sums: 2, -5, 2.5, 1, 2, 0 (zero counts as +): keep the deltas that agree, average them
    out = call("ties", BASE6, [BASE6 + D1, BASE6 + D2], lam=1.0, density=1.0)
    assert torch.allclose(out - BASE6, torch.tensor([3.0, -2.5, 1.25, 1.0, 1.0, 4.0]))


def test_ties_with_trim_and_opposing_signs():
    # top-3 by magnitude: D1 -> [3,-2,0,0,0,-4], D2 -> [0,-3,2,0,0,4]; sums 3,-5,2,0,0,0
    out = call("ties", BASE6, [BASE6 + D1, BASE6 + D2], lam=0.5, density=0.5)
    assert torch.allclose(out - BASE6, 0.5 * torch.tensor([3.0, -2.5, 2.0, 0.0, 0.0, 4.0]))


def test_ties_single_model_is_trimmed_task_vector():
    out = call("ties", BASE6, [BASE6 + D1], lam=0.5, density=0.5)
    assert torch.allclose(out, BASE6 + 0.5 * torch.tensor([3.0, -2.0, 0.0, 0.0, 0.0, -4.0]))


def test_trim_breaks_magnitude_ties_in_row_major_order():
    d = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5])
    assert torch.equal(trim(d, 0.4), torch.tensor([0.0, -2.0, 2.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trim_keeps_exactly_the_top_k_of_a_big_tensor(dtype, monkeypatch):
    # several chunks, a strided sample and, in bf16, many entries tied at the k-th magnitude
    monkeypatch.setattr(methods, "CHUNK", 1 << 14)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(300_000, generator=g).to(dtype).float()
    order = torch.sort(delta.abs(), descending=True, stable=True).indices
    for k in (1, 7, 1000, 150_000, 299_999, 300_000):
        expected = torch.zeros_like(delta)
        expected[order[:k]] = delta[order[:k]]
        assert torch.equal(trim(delta, k / delta.numel()), expected), k


def test_dare_at_density_one_is_task_arithmetic():
    g = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    ta = call("task_arithmetic", A, [F, g], lam=0.7)
    assert torch.allclose(call("dare_linear", A, [F, g], lam=0.7, density=1.0), ta)


def test_dare_keeps_about_density_and_rescales():
    base = torch.zeros(100_000)
    tuned = torch.ones(100_000)
    out = call("dare_linear", base, [tuned], lam=1.0, density=0.3)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.3))
    assert abs(kept.numel() / 100_000 - 0.3) < 0.01
    assert abs(float(out.mean()) - 1.0) < 0.05  # unbiased in expectation


def test_dare_ties_elects_sign_after_dropping():
    base = torch.zeros(4)
    d = [torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.tensor([-3.0, -1.0, 2.0, 1.0])]
    out = call("dare_ties", base, d, lam=1.0, density=1.0)  # no drop: plain sign election
    assert torch.allclose(out, torch.tensor([-3.0, -1.0, 2.0, -2.0]))


def test_model_stock_identical_fine_tunes_return_them():
    assert torch.allclose(call("model_stock", A, [F, F.clone()]), F, atol=1e-6)


def test_model_stock_ratio_from_the_angle():
    base = torch.zeros(2)
    f1, f2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(call("model_stock", base, [f1, f2]), t * (f1 + f2) / 2)


def test_model_stock_keeps_aligned_when_deltas_disagree():
    assert torch.equal(call("model_stock", A, [A + 1, A - 1]), A)  # c = -1
    assert torch.equal(call("model_stock", A, [A.clone(), F]), A)  # a zero delta: cosine undefined


# --- properties of every method --------------------------------------------------------


def random_inputs(n_tuned, shape=(64, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n_tuned)]


def params_for(m):
    return {k: v for k, v in {"lam": 0.6, "density": 0.5}.items() if k in m.parameters}


@pytest.mark.parametrize("name", list(METHODS))
def test_shape_dtype_and_inputs_unchanged(name):
    m = METHODS[name]
    base, tuned = random_inputs(max(2, m.min_models))
    copies = [base.clone(), *(t.clone() for t in tuned)]
    out = call(name, base, tuned, **params_for(m))
    assert out.shape == base.shape and out.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(copies, [base, *tuned]))
    assert out.data_ptr() not in {t.data_ptr() for t in [base, *tuned]}


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if "lam" in m.parameters])
def test_lambda_zero_returns_aligned(name):
    base, tuned = random_inputs(2)
    out = call(name, base, tuned, **{**params_for(METHODS[name]), "lam": 0.0})
    assert torch.allclose(out, base, atol=1e-6)


@pytest.mark.parametrize("name", list(METHODS))
def test_same_seed_same_bytes(name):
    m = METHODS[name]
    base, tuned = random_inputs(2)
    one = call(name, base, tuned, draws=draws(2, base.shape, 5), **params_for(m))
    two = call(name, base, tuned, draws=draws(2, base.shape, 5), **params_for(m))
    assert torch.equal(one, two)


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_give_the_same_result_in_chunks(name):
    # the engine relies on this to stream big tensors in row chunks; statistics come from
    # the whole tensor (in its stored dtype), the merge itself from each chunk
    m = METHODS[name]
    base, tuned = random_inputs(2, shape=(50, 40))
    base, tuned = base.bfloat16(), [t.bfloat16() for t in tuned]
    u = draws(2, base.shape, 9)
    whole = call(name, base.float(), [t.float() for t in tuned], draws=u, **params_for(m))
    stats = m.stats(base, tuned, **params_for(m))
    parts = [
        m.apply(base[r : r + 7].float(), [t[r : r + 7].float() for t in tuned], stats=stats, start=r * 40, draws=[x[r : r + 7] for x in u], **params_for(m))
        for r in range(0, 50, 7)
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_registry_refuses_duplicates_and_names_the_available_methods():
    with pytest.raises(ValueError, match="registered twice"):
        register("linear", paper="x")(lambda base, tuned, *, lam: base)
    with pytest.raises(ConfigError, match="unknown method 'tie'; available: linear, slerp"):
        get("tie")
    with pytest.raises(ValueError, match="unknown parameters"):
        register("bogus", paper="x")(lambda base, tuned, *, weight: base)
    with pytest.raises(ValueError, match="go together"):
        register("bogus", paper="x")(lambda base, tuned, *, stats: base)
