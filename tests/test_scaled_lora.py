"""A LoRA adapter scaled by λ: peft's merge_and_unload of aligned + scaled adapter must equal
`safemerge merge --method linear/task_arithmetic --lambda λ` of aligned + the original adapter.

"Equal" is measured, not assumed. In float32 the two compute W + λ·s·B@A in different orders
(safemerge: W + s·(B@A), then λ·tuned + (1-λ)·W; peft: W + s·((λ·B)@A)), so they agree to a few
roundings: |diff| <= (r + 4)·eps32·(|W| + λ·s·|B|@|A|) (measured: at most 2.6·eps32·(...)), and
bit for bit at λ = 0 and λ = 1. Rounded to bfloat16 (the merge rounds once), every entry is
bit-identical except where the exact value lies within that float32 error of a bfloat16 rounding
tie; those differ by exactly one bfloat16 ulp (measured: 0 to 5 of 24,736 entries per λ)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, lora_adapter, save_model
from safetensors.torch import load_file

import safemerge
from safemerge.checkpoints.scaled_lora import write_scaled_adapter
from safemerge.errors import ConfigError

EPS32 = torch.finfo(torch.float32).eps
LAMBDAS = [0.0, 0.3, 0.7, 1.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaled")
    base = build_model("llama")
    aligned = {dt: save_model(base, root / f"aligned-{dt}", dt) for dt in (torch.float32, torch.bfloat16)}
    adapters = {
        "plain": lora_adapter(base, root / "plain", seed=0),
        # rsLoRA with per-module rank and alpha: the scale stays the consumer's to compute
        "rslora": lora_adapter(base, root / "rslora", seed=1, use_rslora=True,
                               rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    }
    return root, aligned, adapters


def peft_merged(aligned, adapter) -> dict[str, torch.Tensor]:
    """aligned + adapter merged by peft in float32 (a bfloat16 checkpoint upcasts exactly)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    state = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def magnitude(aligned_state, adapter, lam) -> dict[str, torch.Tensor]:
    """|W| + λ·s·|B|@|A| per tensor: the scale of the float32 rounding errors of either order."""
    factors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    for name, w in aligned_state.items():
        m = w.float().abs()
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in factors:
            a, b = factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"]
            key = next((k for k in config.get("alpha_pattern") or {} if module.endswith(k)), None)
            alpha = config["alpha_pattern"][key] if key else config["lora_alpha"]
            s = alpha / (a.shape[0] ** 0.5 if config.get("use_rslora") else a.shape[0])
            m = m + lam * s * (b.abs() @ a.abs())
        out[name] = m
    return out


@pytest.mark.parametrize("kind", ["plain", "rslora"])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_scaled_adapter_gives_the_merged_weights(setup, kind, lam):
    root, aligned, adapters = setup
    adapter = adapters[kind]
    scaled = write_scaled_adapter(adapter, lam, root / f"{kind}-scaled-{lam}")
    r = json.loads((adapter / "adapter_config.json").read_text())["r"]
    for dtype, aligned_dir in aligned.items():
        theirs = peft_merged(aligned_dir, scaled)
        a_state = load_file(aligned_dir / "model.safetensors")
        size = magnitude(a_state, adapter, lam)
        for method in ("linear", "task_arithmetic"):
            out = root / f"{kind}-{dtype}-{lam}-{method}"
            safemerge.merge(str(aligned_dir), [str(adapter)], out, method=method, lam=lam, progress=False)
            ours = load_file(out / "model.safetensors")
            assert set(ours) == set(a_state)
            for name, mine in ours.items():
                assert mine.dtype == dtype
                exact = theirs[name]  # float32
                if dtype == torch.float32:
                    if lam in (0.0, 1.0):
                        assert torch.equal(mine, exact), name
                    tol = (r + 4) * EPS32 * size[name]
                    assert ((mine - exact).abs() <= tol).all(), (name, ((mine - exact).abs() / tol).max())
                else:
                    check_bf16(mine, exact, (r + 4) * EPS32 * size[name], name)


def check_bf16(mine: torch.Tensor, exact: torch.Tensor, tol: torch.Tensor, name: str) -> None:
    """Equal after one rounding to bfloat16, except next to a rounding tie: there one ulp apart."""
    rounded = exact.to(torch.bfloat16)
    differ = mine != rounded
    if not differ.any():
        return
    lo, hi = torch.minimum(mine, rounded).float(), torch.maximum(mine, rounded).float()
    assert (torch.nextafter(lo.to(torch.bfloat16), hi.to(torch.bfloat16)).float() == hi)[differ].all(), name
    tie = (lo + hi) / 2  # exact in float32
    assert ((exact - tie).abs() <= tol)[differ].all(), name


def test_files_scale_only_lora_b(setup, tmp_path):
    _, _, adapters = setup
    adapter = adapters["rslora"]
    out = write_scaled_adapter(adapter, 0.3, tmp_path / "s")
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(before) == set(after)
    for key, t in before.items():
        if ".lora_B." in key:
            assert after[key].dtype == torch.float32
            assert torch.equal(after[key], t.float() * 0.3)
        else:
            assert torch.equal(after[key], t)
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((adapter / "adapter_config.json").read_text())


def test_refuses_full_tensors_and_bad_lambda(setup, tmp_path):
    _, _, adapters = setup
    with_full = lora_adapter(build_model("llama"), tmp_path / "full", seed=2, modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="lm_head"):
        write_scaled_adapter(with_full, 0.5, tmp_path / "out")
    dora = lora_adapter(build_model("llama"), tmp_path / "dora", seed=2, use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        write_scaled_adapter(dora, 0.5, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        write_scaled_adapter(adapters["plain"], 1.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
