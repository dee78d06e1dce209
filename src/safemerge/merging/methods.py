"""The merge math: one small pure function per method, registered by name.

A method takes the aligned tensor ``base`` and the fine-tuned tensors ``tuned`` (one per
fine-tuned model, never mutated), float32 and of one shape, and returns a new float32
tensor. λ (``lam``) is always the weight of the fine-tuned model.

Every method computes its output entry by entry, so the engine streams a tensor through
it in chunks: memory stays flat and caches stay warm. A method that first needs a
statistic of the whole tensor (slerp's angle, TIES's magnitude threshold, Model Stock's
cosines) registers a ``prepare`` function: it sees the whole tensors as ``Flat`` views, which
read rows only when a chunk asks for them (so a 262k-row embedding is never held whole),
computes in float32 chunks with float64 sums, and its result reaches the method as
``stats``. A method that needs its chunk's position takes ``start``, the flat index of the
chunk's first entry. Calling a registered ``Method`` on whole tensors runs both steps.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from safemerge.errors import ConfigError

PARAMETERS = ("lam", "density", "draws")  # what a user sets (draws: from --seed)
SUPPLIED = ("stats", "start")  # what the engine supplies
CHUNK = 1 << 20  # entries per chunk when a prepare step walks a whole tensor


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Tensor]
    paper: str
    min_models: int
    prepare: Callable | None  # whole tensors -> stats, for methods that need them
    takes: frozenset[str]  # fn's keyword-only parameters
    prepare_takes: frozenset[str]

    @property
    def parameters(self) -> frozenset[str]:
        """The user-set parameters (of PARAMETERS) the method uses."""
        return (self.takes | self.prepare_takes) & frozenset(PARAMETERS)

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def stats(self, base: Tensor | Flat, tuned: list[Tensor | Flat], **params):
        """The whole-tensor statistics, from tensors in hand or from ``Flat`` views read on demand."""
        if self.prepare is None:
            return None
        return self.prepare(Flat.of(base), [Flat.of(t) for t in tuned], **pick(params, self.prepare_takes))

    def apply(self, base: Tensor, tuned: list[Tensor], *, stats=None, start: int = 0, **params) -> Tensor:
        """The merged entries of one chunk (or of the whole tensor)."""
        kwargs = pick({**params, "stats": stats, "start": start}, self.takes)
        return self.fn(base, tuned, **kwargs)

    def __call__(self, base: Tensor, tuned: list[Tensor], **params) -> Tensor:
        return self.apply(base, tuned, stats=self.stats(base, tuned, **params), **params)


def pick(params: dict, names: frozenset[str]) -> dict:
    return {k: v for k, v in params.items() if k in names}


METHODS: dict[str, Method] = {}


def keyword_only(fn) -> frozenset[str]:
    sig = inspect.signature(fn)
    return frozenset(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)


def register(name: str, *, paper: str, prepare: Callable | None = None, min_models: int = 1):
    """Register a merge function under ``name``; keyword-only parameters declare what it takes."""

    def add(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        takes, prepare_takes = keyword_only(fn), keyword_only(prepare) if prepare else frozenset()
        unknown = (takes - set(PARAMETERS) - set(SUPPLIED)) | (prepare_takes - set(PARAMETERS))
        if unknown:
            raise ValueError(f"merge method {name!r} takes unknown parameters {sorted(unknown)}")
        if ("stats" in takes) != (prepare is not None):
            raise ValueError(f"merge method {name!r}: a prepare function and a `stats` parameter go together")
        METHODS[name] = Method(name, fn, paper, min_models, prepare, takes, prepare_takes)
        return fn

    return add


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


# --- shared pieces --------------------------------------------------------------------


def mean(tensors: list[Tensor], scale: float = 1.0) -> Tensor:
    """scale · uniform average, as a new tensor (scaling here saves a pass over the data)."""
    if len(tensors) == 1:
        return tensors[0] * scale
    out = tensors[0] + tensors[1]
    for t in tensors[2:]:
        out.add_(t)
    return out.mul_(scale / len(tensors))


def deltas(base: Tensor, tuned: list[Tensor]) -> list[Tensor]:
    return [t - base for t in tuned]


def drop_and_rescale(delta: Tensor, density: float, draw: Tensor) -> Tensor:
    """DARE: keep each entry whose uniform draw in [0, 1) is below ``density`` (so with that
    probability) and divide the kept ones by it. The engine makes the draws: see
    ``merge.dare_generators`` for the seeded stream."""
    if density >= 1:
        return delta
    keep = torch.lt(draw, density, out=torch.empty_like(delta))  # 0/1 floats: faster than a bool mask
    return delta.mul_(keep).div_(density)


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


# --- whole-tensor statistics, in chunks --------------------------------------------------


@dataclass(frozen=True)
class Flat:
    """A tensor of ``shape`` seen as its flat entries, in float32; ``read_rows(r0, r1)`` gives rows
    [r0, r1) in any float dtype. Indexing reads only the rows a flat slice covers."""

    shape: tuple[int, ...]
    read_rows: Callable[[int, int], Tensor]

    @classmethod
    def of(cls, x: Tensor | Flat) -> Flat:
        if isinstance(x, Flat):
            return x
        return cls(tuple(x.shape), (lambda r0, r1: x[r0:r1]) if x.dim() else (lambda r0, r1: x))

    def numel(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, s: slice) -> Tensor:
        start, stop, step = s.indices(self.numel())
        row = math.prod(self.shape[1:]) if self.shape else 1
        r0 = start // row
        rows = self.read_rows(r0, max(r0, -(-stop // row))).reshape(-1)
        return rows[start - r0 * row : stop - r0 * row : step].float()


def flat_chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


_POOL: ThreadPoolExecutor | None = None


def over_chunks(fn: Callable[[slice], object], n: int) -> list:
    """``fn`` on every flat chunk, in order, spread over the cores: a statistic pass is the
    slow part of slerp, TIES and Model Stock, and its chunks are independent."""
    global _POOL
    if _POOL is None:
        # each worker runs torch on one thread: without that every worker starts an OpenMP team of its own, and
        # with more OpenMP threads than cores libgomp stops spinning, which slows every later torch call (2x
        # slower generation after a slerp trial, measured)
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="safemerge-stats",
                                   initializer=torch.set_num_threads, initargs=(1,))
    return list(_POOL.map(fn, flat_chunks(n)))


def flat_delta(base: Flat, fine: Flat, s: slice) -> Tensor:
    """fine − base on a flat slice, in float32: bit for bit what a method computes on that chunk."""
    return fine[s] - base[s]


def dot_products(base: Flat, tuned: list[Flat], rows: Callable[[slice], list[Tensor]]) -> list[list[float]]:
    """All dot products among the float32 vectors ``rows(chunk)`` returns, summed over chunks in float64."""
    def dots(s: slice) -> list[list[float]]:
        r = rows(s)
        return [[float(torch.dot(x, y)) for y in r] for x in r]

    parts = over_chunks(dots, base.numel())
    return [[math.fsum(p[i][j] for p in parts) for j in range(len(parts[0]))] for i in range(len(parts[0]))]


@dataclass(frozen=True)
class Trim:
    """The entries of a delta that TIES keeps: |δ| > threshold, and |δ| == threshold at flat
    indices below ``cutoff`` (ties at the k-th magnitude are kept in row-major order)."""

    threshold: float
    cutoff: int

    def keep(self, d: Tensor, start: int) -> Tensor:
        """0/1 float mask for a chunk ``d`` whose first entry has flat index ``start``."""
        magnitude = d.abs().reshape(-1)
        tie = magnitude == self.threshold if self.cutoff > start else None
        keep = magnitude.gt_(self.threshold)  # in place, as float: faster than a bool mask
        if tie is not None:
            tie[max(0, self.cutoff - start) :] = False
            keep.add_(tie)
        return keep.view(d.shape)


def trim_rule(base: Flat, fine: Flat, density: float) -> Trim:
    """Find the k = max(1, int(density·numel)) largest |fine − base|.

    A strided sample brackets the k-th magnitude; one chunked pass counts the entries above
    the bracket and inside it, a second collects those inside with their positions, and only
    those are selected on. Magnitudes are recomputed per chunk, never stored whole. Falls back
    to one full selection when the bracket misses.
    """
    n = base.numel()
    k = max(1, int(density * n))
    if k >= n:
        return Trim(-1.0, 0)
    lo, hi = sample_bracket(base, fine, n, k)

    def count(s: slice) -> tuple[int, int]:
        m = flat_delta(base, fine, s).abs_()
        over = torch.gt(m, hi, out=torch.empty_like(m))  # float masks: much faster than bool ones here
        return int(over.sum()), int(torch.ge(m, lo, out=torch.empty_like(m)).sub_(over).sum())

    counts = over_chunks(count, n)
    above, inside = sum(c[0] for c in counts), [c[1] for c in counts]
    if above < k <= above + sum(inside):
        values, positions = bracketed(base, fine, n, lo, hi, inside)
    else:  # the sample missed: select on everything
        above, values = 0, flat_delta(base, fine, slice(None)).abs_()
        positions = torch.arange(n)
    threshold = float(values.kthvalue(values.numel() - (k - above) + 1).values)
    keep_ties = k - above - int((values > threshold).sum())  # every tie is a candidate
    ties = positions[values == threshold]  # in row-major order
    return Trim(threshold, int(ties[keep_ties]) if keep_ties < ties.numel() else n)


# Chunk results go into buffers allocated once, at offsets known in advance: small tensors kept per chunk
# would pin the allocator's heap above each chunk's freed temporaries, so it grows by a chunk per chunk
# (740 MB on Gemma 3's 262k-row embeddings, measured).


def chunk_offsets(n: int, sizes: list[int]) -> dict[int, tuple[int, int]]:
    """Flat chunk start -> [begin, end) of the chunk's ``sizes`` results in a shared buffer."""
    bounds, at = {}, 0
    for s, size in zip(flat_chunks(n), sizes, strict=True):
        bounds[s.start], at = (at, at + size), at + size
    return bounds


def sample_bracket(base: Flat, fine: Flat, n: int, k: int) -> tuple[float, float]:
    """Magnitudes (lo, hi) that probably bracket the k-th largest |δ|, from every step-th entry."""
    step = max(1, n // 65536)
    picks = {s.start: slice(s.start + (-s.start) % step, s.stop, step) for s in flat_chunks(n)}
    where = chunk_offsets(n, [len(range(p.start, p.stop, p.step)) for p in picks.values()])
    sample = torch.empty(sum(b - a for a, b in where.values()))

    def take(s: slice) -> None:
        a, b = where[s.start]
        sample[a:b] = flat_delta(base, fine, picks[s.start]).abs_()

    over_chunks(take, n)
    size = sample.numel()
    pos = (k - 1) * size / n  # where the k-th largest falls in the sample, from the top
    margin = 4 * math.sqrt(size) + 8
    hi = float(sample.kthvalue(size - max(0, int(pos - margin))).values)  # probably above the answer
    lo = float(sample.kthvalue(size - min(size - 1, int(pos + margin))).values)  # probably below it
    return lo, hi


def bracketed(base: Flat, fine: Flat, n: int, lo: float, hi: float, inside: list[int]) -> tuple[Tensor, Tensor]:
    """The magnitudes in [lo, hi] and their flat positions, in row-major order."""
    where = chunk_offsets(n, inside)
    values, positions = torch.empty(sum(inside)), torch.empty(sum(inside), dtype=torch.int64)

    def take(s: slice) -> None:
        a, b = where[s.start]
        m = flat_delta(base, fine, s).abs_()
        keep = torch.ge(m, lo).logical_and_(torch.le(m, hi))
        torch.masked_select(m, keep, out=values[a:b])
        torch.add(keep.nonzero().squeeze(1), s.start, out=positions[a:b])

    over_chunks(take, n)
    return values, positions


def trim(delta: Tensor, density: float) -> Tensor:
    """TIES trim of one delta: exactly its k largest-magnitude entries survive."""
    return METHODS["ties"](torch.zeros_like(delta), [delta], lam=1.0, density=density)


# --- prepare steps -----------------------------------------------------------------------


def slerp_coefficients(base: Flat, tuned: list[Flat], *, lam: float) -> tuple[float, float]:
    """(ca, cf) such that slerp = ca·aligned + cf·mean(fine-tuned), from the angle between them.

    Linear coefficients (1 − λ, λ) when a norm is below 1e-8 or |cos θ| > 0.9995.
    """
    def rows(s: slice) -> list[Tensor]:
        fs = [t[s] for t in tuned]
        return [base[s], fs[0] if len(fs) == 1 else mean(fs)]

    g = dot_products(base, tuned, rows)
    a_norm, f_norm = math.sqrt(g[0][0]), math.sqrt(g[1][1])
    c = g[0][1] / (a_norm * f_norm) if min(a_norm, f_norm) >= 1e-8 else 1.0
    if abs(c) > 0.9995:  # nearly parallel (or a zero tensor): the arc is a line
        return 1 - lam, lam
    theta = math.acos(c)
    return math.sin((1 - lam) * theta) / math.sin(theta), math.sin(lam * theta) / math.sin(theta)


def trims(base: Flat, tuned: list[Flat], *, density: float) -> list[Trim]:
    return [trim_rule(base, t, density) for t in tuned]


def model_stock_ratio(base: Flat, tuned: list[Flat]) -> float:
    """Model Stock's t = N·c / (1 + (N − 1)·c) for one tensor, c the mean pairwise cosine of the
    deltas. Interpretation: t = 0 (keep the aligned tensor) when c ≤ 0, where the formula
    would extrapolate away from the fine-tuned models, and when a delta is zero (no cosine)."""
    g = dot_products(base, tuned, lambda s: [flat_delta(base, t, s) for t in tuned])
    n = len(tuned)
    norms = [math.sqrt(g[i][i]) for i in range(n)]
    if min(norms) < 1e-12:
        return 0.0
    cosines = [g[i][j] / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)]
    c = min(1.0, sum(cosines) / len(cosines))
    return 0.0 if c <= 0 else n * c / (1 + (n - 1) * c)


# --- the methods ----------------------------------------------------------------------


@register("linear", paper="https://arxiv.org/abs/2203.05482")
def linear(base: Tensor, tuned: list[Tensor], *, lam: float) -> Tensor:
    """(1 − λ)·aligned + λ·mean(fine-tuned)."""
    return mean(tuned, lam).add_(base, alpha=1 - lam)


@register("slerp", paper="https://dl.acm.org/doi/10.1145/325165.325242", prepare=slerp_coefficients)
def slerp(base: Tensor, tuned: list[Tensor], *, stats: tuple[float, float]) -> Tensor:
    """Spherical interpolation from aligned to mean(fine-tuned) by λ; linear when nearly parallel."""
    ca, cf = stats
    return mean(tuned, cf).add_(base, alpha=ca)


@register("task_arithmetic", paper="https://arxiv.org/abs/2212.04089")
def task_arithmetic(base: Tensor, tuned: list[Tensor], *, lam: float) -> Tensor:
    """aligned + λ·mean(fine-tuned − aligned)."""
    return mean(deltas(base, tuned), lam).add_(base)


@register("ties", paper="https://arxiv.org/abs/2306.01708", prepare=trims)
def ties(base: Tensor, tuned: list[Tensor], *, lam: float, stats: list[Trim], start: int) -> Tensor:
    """aligned + λ·(sign-elected mean of the deltas trimmed to their top density fraction)."""
    trimmed = []
    for d, rule in zip(deltas(base, tuned), stats):
        trimmed.append(d.mul_(rule.keep(d, start)))
    return sign_consensus_mean(trimmed).mul_(lam).add_(base)


@register("dare_linear", paper="https://arxiv.org/abs/2311.03099")
def dare_linear(
    base: Tensor, tuned: list[Tensor], *, lam: float, density: float, draws: list[Tensor]
) -> Tensor:
    """aligned + λ·mean(drop-and-rescaled deltas)."""
    dropped = [drop_and_rescale(d, density, u) for d, u in zip(deltas(base, tuned), draws)]
    return mean(dropped, lam).add_(base)


@register("dare_ties", paper="https://arxiv.org/abs/2311.03099")
def dare_ties(
    base: Tensor, tuned: list[Tensor], *, lam: float, density: float, draws: list[Tensor]
) -> Tensor:
    """aligned + λ·(sign-elected mean of the drop-and-rescaled deltas)."""
    dropped = [drop_and_rescale(d, density, u) for d, u in zip(deltas(base, tuned), draws)]
    return sign_consensus_mean(dropped).mul_(lam).add_(base)


@register("model_stock", paper="https://arxiv.org/abs/2403.19522", prepare=model_stock_ratio, min_models=2)
def model_stock(base: Tensor, tuned: list[Tensor], *, stats: float) -> Tensor:
    """t·mean(fine-tuned) + (1 − t)·aligned, t = N·c / (1 + (N − 1)·c), c = mean pairwise cosine."""
    return mean(tuned, stats).add_(base, alpha=1 - stats)
