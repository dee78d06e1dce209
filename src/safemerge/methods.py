"""The merge math: one small pure function per method, registered by name.

Every method takes the aligned tensor ``base`` and the fine-tuned tensors ``tuned``
(one per fine-tuned model, never mutated), all float32 and of one shape, and returns a
new float32 tensor. λ (``lam``) is always the weight of the fine-tuned model.

A method is *elementwise* when each output entry depends only on the input entries at
the same position; the engine then feeds it contiguous chunks of a tensor instead of the
whole tensor, which keeps memory flat and caches warm. Whole-tensor methods (slerp, ties,
model_stock) see complete tensors.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .errors import ConfigError

PARAMETERS = ("lam", "density", "gens")  # every keyword a method may take


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Tensor]
    paper: str
    elementwise: bool
    min_models: int
    takes: frozenset[str]  # derived from fn's keyword-only parameters

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def __call__(self, base: Tensor, tuned: list[Tensor], **params) -> Tensor:
        return self.fn(base, tuned, **{k: v for k, v in params.items() if k in self.takes})


METHODS: dict[str, Method] = {}


def register(name: str, *, paper: str, elementwise: bool, min_models: int = 1):
    """Register a merge function under ``name``; its keyword-only parameters declare what it takes."""

    def add(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        sig = inspect.signature(fn)
        takes = frozenset(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)
        unknown = takes - set(PARAMETERS)
        if unknown:
            raise ValueError(f"merge method {name!r} takes unknown parameters {sorted(unknown)}")
        METHODS[name] = Method(name, fn, paper, elementwise, min_models, takes)
        return fn

    return add


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


# --- shared pieces --------------------------------------------------------------------


def mean(tensors: list[Tensor]) -> Tensor:
    """Uniform average, as a new tensor."""
    if len(tensors) == 1:
        return tensors[0].clone()
    out = tensors[0] + tensors[1]
    for t in tensors[2:]:
        out.add_(t)
    return out.div_(len(tensors))


def deltas(base: Tensor, tuned: list[Tensor]) -> list[Tensor]:
    return [t - base for t in tuned]


def drop_and_rescale(delta: Tensor, density: float, gen: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it.

    Draw order (fixed): one float32 uniform per entry, ``torch.rand`` on the given CPU
    generator in row-major order; an entry is kept when its draw is below ``density``.
    Drawing a tensor in consecutive chunks gives the same draws as drawing it whole.
    """
    keep = torch.rand(delta.shape, generator=gen) < density
    return delta.mul_(keep).div_(density) if density < 1 else delta


def sign_consensus_mean(deltas: list[Tensor]) -> Tensor:
    """TIES sign election: per entry, the mean of the nonzero deltas that agree with the
    sign of their sum (a zero sum counts as positive); entries with none stay 0.
    With one delta that is the delta itself (returned as is)."""
    if len(deltas) == 1:
        return deltas[0]
    total = mean(deltas)  # same sign as the sum
    positive = total >= 0
    acc = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for d in deltas:
        agree = torch.where(positive, d > 0, d < 0)
        acc.add_(torch.where(agree, d, 0.0))
        count.add_(agree)
    return acc.div_(count.clamp_(min=1))


CHUNK = 1 << 20  # whole-tensor methods loop over flat chunks of this size: no big temporaries


def flat_chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


@dataclass(frozen=True)
class Trim:
    """The entries of a delta that TIES keeps: |δ| > threshold, and |δ| == threshold at flat
    indices below ``cutoff`` (ties at the k-th magnitude are kept in row-major order)."""

    threshold: float
    cutoff: int

    def keep(self, d: Tensor, start: int) -> Tensor:
        magnitude = d.abs()
        keep = magnitude > self.threshold
        if self.cutoff > start:
            tie = magnitude == self.threshold
            tie[max(0, self.cutoff - start) :] = False
            keep |= tie
        return keep


def trim_rule(base: Tensor, fine: Tensor, density: float) -> Trim:
    """Find the k = max(1, int(density·numel)) largest |fine − base| of two flat tensors.

    A strided sample brackets the k-th magnitude; one chunked pass counts the entries above
    the bracket and collects those inside it, and only those are selected on. Magnitudes
    are recomputed per chunk, never stored whole. Falls back to one full selection when the
    bracket misses.
    """
    n = base.numel()
    k = max(1, int(density * n))
    if k >= n:
        return Trim(-1.0, 0)
    step = max(1, n // 65536)
    sample = (fine[::step] - base[::step]).abs_().sort(descending=True).values
    pos = (k - 1) * sample.numel() / n
    margin = 4 * math.sqrt(sample.numel()) + 8
    hi = float(sample[max(0, int(pos - margin))])  # probably above the answer
    lo = float(sample[min(sample.numel() - 1, int(pos + margin))])  # probably below it
    above, inside = 0, []
    for s in flat_chunks(n):
        m = (fine[s] - base[s]).abs_()
        above += int((m > hi).sum())
        inside.append(m[(m <= hi) & (m >= lo)])
    candidates = torch.cat(inside)
    if not above < k <= above + candidates.numel():  # the sample missed: select on everything
        above, candidates = 0, (fine - base).abs_()
    threshold = float(candidates.kthvalue(candidates.numel() - (k - above) + 1).values)
    keep_ties = k - above - int((candidates > threshold).sum())  # every tie is a candidate
    if keep_ties == int((candidates == threshold).sum()):
        return Trim(threshold, n)
    return Trim(threshold, tie_position(base, fine, threshold, keep_ties))


def tie_position(base: Tensor, fine: Tensor, threshold: float, count: int) -> int:
    """Flat index of the (count+1)-th entry whose |fine − base| equals ``threshold``."""
    seen = 0
    for s in flat_chunks(base.numel()):
        tie = (fine[s] - base[s]).abs_() == threshold
        here = int(tie.sum())
        if seen + here > count:
            return s.start + int(tie.nonzero()[count - seen])
        seen += here
    raise RuntimeError("tie_position: fewer ties than counted")  # internal invariant


def trim(delta: Tensor, density: float) -> Tensor:
    """TIES trim of one delta: exactly its k largest-magnitude entries survive."""
    return ties(torch.zeros_like(delta), [delta], lam=1.0, density=density)


# --- the methods ----------------------------------------------------------------------


@register("linear", paper="https://arxiv.org/abs/2203.05482", elementwise=True)
def linear(base: Tensor, tuned: list[Tensor], *, lam: float) -> Tensor:
    """(1 − λ)·aligned + λ·mean(fine-tuned)."""
    return mean(tuned).mul_(lam).add_(base, alpha=1 - lam)


@register("slerp", paper="https://dl.acm.org/doi/10.1145/325165.325242", elementwise=False)
def slerp(base: Tensor, tuned: list[Tensor], *, lam: float) -> Tensor:
    """Spherical interpolation from aligned to mean(fine-tuned) by λ; linear when nearly parallel."""
    f = mean(tuned)
    b, fl = base.reshape(-1), f.reshape(-1)
    g = gram(b.numel(), lambda s: torch.stack([b[s], fl[s]]))
    a_norm, f_norm = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    c = g[0][1] / (a_norm * f_norm) if min(a_norm, f_norm) >= 1e-8 else 1.0
    if abs(c) > 0.9995:  # nearly parallel (or a zero tensor): the arc is a line
        return f.mul_(lam).add_(base, alpha=1 - lam)
    theta = math.acos(c)
    s = math.sin(theta)
    return f.mul_(math.sin(lam * theta) / s).add_(base, alpha=math.sin((1 - lam) * theta) / s)


@register("task_arithmetic", paper="https://arxiv.org/abs/2212.04089", elementwise=True)
def task_arithmetic(base: Tensor, tuned: list[Tensor], *, lam: float) -> Tensor:
    """aligned + λ·mean(fine-tuned − aligned)."""
    return mean(deltas(base, tuned)).mul_(lam).add_(base)


@register("ties", paper="https://arxiv.org/abs/2306.01708", elementwise=False)
def ties(base: Tensor, tuned: list[Tensor], *, lam: float, density: float) -> Tensor:
    """aligned + λ·(sign-elected mean of the deltas trimmed to their top density fraction)."""
    b, fs = base.reshape(-1), [t.reshape(-1) for t in tuned]
    rules = [trim_rule(b, f, density) for f in fs]
    out = torch.empty_like(b)
    for s in flat_chunks(b.numel()):
        trimmed = []
        for f, rule in zip(fs, rules):
            d = f[s] - b[s]
            trimmed.append(d.mul_(rule.keep(d, s.start)))
        out[s] = sign_consensus_mean(trimmed).mul_(lam).add_(b[s])
    return out.view(base.shape)


@register("dare_linear", paper="https://arxiv.org/abs/2311.03099", elementwise=True)
def dare_linear(
    base: Tensor, tuned: list[Tensor], *, lam: float, density: float, gens: list[torch.Generator]
) -> Tensor:
    """aligned + λ·mean(drop-and-rescaled deltas)."""
    dropped = [drop_and_rescale(d, density, g) for d, g in zip(deltas(base, tuned), gens)]
    return mean(dropped).mul_(lam).add_(base)


@register("dare_ties", paper="https://arxiv.org/abs/2311.03099", elementwise=True)
def dare_ties(
    base: Tensor, tuned: list[Tensor], *, lam: float, density: float, gens: list[torch.Generator]
) -> Tensor:
    """aligned + λ·(sign-elected mean of the drop-and-rescaled deltas)."""
    dropped = [drop_and_rescale(d, density, g) for d, g in zip(deltas(base, tuned), gens)]
    return sign_consensus_mean(dropped).mul_(lam).add_(base)


@register("model_stock", paper="https://arxiv.org/abs/2403.19522", elementwise=False, min_models=2)
def model_stock(base: Tensor, tuned: list[Tensor]) -> Tensor:
    """t·mean(fine-tuned) + (1 − t)·aligned, t = N·c / (1 + (N − 1)·c), c = mean pairwise cosine.

    Interpretation: when c ≤ 0 (deltas that disagree) or a delta is zero (cosine undefined),
    t = 0 and the aligned tensor is kept; the formula would otherwise extrapolate away from
    the fine-tuned models. See ``model_stock_ratio``.
    """
    t = model_stock_ratio(base, tuned)
    return mean(tuned).mul_(t).add_(base, alpha=1 - t)


def model_stock_ratio(base: Tensor, tuned: list[Tensor]) -> float:
    """Model Stock's interpolation ratio t for one tensor (0 when c ≤ 0 or undefined)."""
    b, fs = base.reshape(-1), [t.reshape(-1) for t in tuned]
    g = gram(b.numel(), lambda s: torch.stack([f[s] - b[s] for f in fs]))
    norms = [math.sqrt(g[i][i]) for i in range(len(fs))]
    if min(norms) < 1e-12:
        return 0.0
    n = len(fs)
    cosines = [g[i][j] / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)]
    c = min(1.0, sum(cosines) / len(cosines))
    return 0.0 if c <= 0 else n * c / (1 + (n - 1) * c)


def gram(n: int, rows) -> list[list[float]]:
    """Dot products of the rows that ``rows(chunk)`` gives, summed over chunks in float64."""
    total = None
    for s in flat_chunks(n):
        r = rows(s).double()
        part = r @ r.T
        total = part if total is None else total.add_(part)
    return total.tolist()
