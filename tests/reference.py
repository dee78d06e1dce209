"""An independent, direct implementation of every merge method on whole state dicts, in
float64, written from the formulas in the README (not from safemerge's code)."""

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(directory / f))
    return state


def dare_mask(seed: int, name: str, i: int, shape, density: float) -> torch.Tensor:
    """The documented draw: torch.rand on a CPU generator seeded from sha256('seed:name:i')."""
    s = int.from_bytes(hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest()[:8], "little") >> 1
    return torch.rand(shape, generator=torch.Generator().manual_seed(s)) < density


def top_k(d: torch.Tensor, density: float) -> torch.Tensor:
    flat = d.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(d.shape)


def elect(deltas: list[torch.Tensor]) -> torch.Tensor:
    sign = torch.where(sum(deltas) >= 0, 1.0, -1.0).to(torch.float64)
    agree = [(torch.sign(d) == sign) for d in deltas]
    total = sum(torch.where(m, d, 0.0) for m, d in zip(agree, deltas))
    count = sum(m.to(torch.float64) for m in agree)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def reference(method: str, name: str, a: torch.Tensor, fs: list[torch.Tensor], lam=0.5, density=0.5, seed=42):
    a = a.to(torch.float64)
    fs = [f.to(torch.float64) for f in fs]
    f = sum(fs) / len(fs)
    ds = [x - a for x in fs]
    if method == "linear":
        return (1 - lam) * a + lam * f
    if method == "task_arithmetic":
        return a + lam * sum(ds) / len(ds)
    if method == "slerp":
        na, nf = a.norm(), f.norm()
        c = float((a * f).sum() / (na * nf)) if na >= 1e-8 and nf >= 1e-8 else 1.0
        if na < 1e-8 or nf < 1e-8 or abs(c) > 0.9995:
            return (1 - lam) * a + lam * f
        th = math.acos(c)
        return math.sin((1 - lam) * th) / math.sin(th) * a + math.sin(lam * th) / math.sin(th) * f
    if method == "ties":
        return a + lam * elect([top_k(d, density) for d in ds])
    if method in ("dare_linear", "dare_ties"):
        dropped = [d * dare_mask(seed, name, i, d.shape, density) / density for i, d in enumerate(ds)]
        return a + lam * (sum(dropped) / len(dropped) if method == "dare_linear" else elect(dropped))
    if method == "model_stock":
        flat = [d.reshape(-1) for d in ds]
        if min(float(d.norm()) for d in flat) < 1e-12:
            return a
        n = len(flat)
        cos = [float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) for i in range(n) for j in range(i + 1, n)]
        c = min(1.0, sum(cos) / len(cos))
        if c <= 0:
            return a
        t = n * c / (1 + (n - 1) * c)
        return t * f + (1 - t) * a
    raise ValueError(method)


def assert_matches(ours: torch.Tensor, ref64: torch.Tensor, name: str) -> int:
    """float32 outputs: within float32 rounding. Lower precision: within one unit of the
    float64 result rounded once. Returns how many entries equal the once-rounded reference:
    bfloat16 inputs put many exact results on a rounding midpoint, where float32 and float64
    arithmetic may round apart, so callers check that fraction over a whole model."""
    assert ours.shape == ref64.shape, name
    expected = ref64.to(ours.dtype)
    if ours.dtype == torch.float32:
        assert torch.allclose(ours.double(), ref64, rtol=1e-5, atol=1e-6), name
    else:
        assert torch.allclose(ours.double(), expected.double(), rtol=2**-7, atol=1e-6), name
    return int((ours == expected).sum())
