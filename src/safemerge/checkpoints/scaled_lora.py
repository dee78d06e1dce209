"""A LoRA adapter scaled by λ: aligned + λ·(its update) is the linear / task_arithmetic merge at λ.

For a LoRA fine-tune F = W + s·B@A, both linear, (1-λ)·W + λ·F, and task_arithmetic, W + λ·(F - W),
are W + λ·s·B@A: the aligned model with a LoRA whose B is λ·B. An engine that serves LoRA requests
(vLLM) then generates for every λ of a sweep from one copy of the aligned weights.

λ goes into the lora_B tensors, not into lora_alpha: the scale s (alpha/r, alpha/√r for rsLoRA,
alpha_pattern / rank_pattern per module) is left for the consumer to compute exactly as it does for
the original adapter, so the scaled adapter means "λ times the original" to any reader of PEFT
adapters. B is written in float32 (λ·B rounded once at float32, not again at bf16); peft upcasts
adapter weights to float32 anyway and vLLM casts them to its LoRA dtype on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from safemerge.checkpoints.files import TensorFiles, load_json
from safemerge.checkpoints.lora import open_adapter
from safemerge.checkpoints.writer import atomic_directory, copy_file, write_file
from safemerge.errors import CheckpointError, ConfigError

LORA_A = re.compile(r".+\.(lora_A\.weight|lora_embedding_A)$")
LORA_B = re.compile(r".+\.(lora_B\.weight|lora_embedding_B)$")
WEIGHTS = "adapter_model.safetensors"


def write_scaled_adapter(adapter_dir: Path, lam: float, out: Path, *, force: bool = False) -> Path:
    """Write to ``out`` a PEFT adapter whose update is λ times that of ``adapter_dir``; return ``out``.

    λ is the weight of the fine-tuned model, in [0, 1]. Refuses adapters that also save full tensors
    (modules_to_save, resized embeddings): those are not W + low-rank update, so base + scaled adapter
    would not be the merge. The directory appears complete or not at all.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_lambda(lam)
    files = lora_tensor_files(adapter_dir)
    try:
        tensors = {key: scaled(key, files.read(key), lam) for key in files.infos}
    finally:
        files.close()
    config = load_json(adapter_dir / "adapter_config.json")
    with atomic_directory(out, force) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt", "safemerge_lora_scale": repr(float(lam))})
        write_file(tmp / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_file(tmp / "safemerge_scaled.json", json.dumps(
            {"source": str(adapter_dir.resolve()), "lambda": lam, "scaled": "lora_B (float32)"}, indent=2) + "\n")
        for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (adapter_dir / extra).exists():
                copy_file(adapter_dir / extra, tmp / extra)
    return out


def check_lambda(lam: float) -> None:
    if not (isinstance(lam, (int, float)) and 0 <= lam <= 1):  # also refuses NaN
        raise ConfigError(f"λ is the weight of the fine-tuned model and must lie in [0, 1]; got {lam}")


def lora_tensor_files(adapter_dir: Path) -> TensorFiles:
    """The adapter's safetensors, checked to hold only lora_A / lora_B pairs of a supported kind."""
    try:
        adapter = open_adapter(adapter_dir, str(adapter_dir), allow_pickle=False)
    except CheckpointError as e:
        raise ConfigError(f"cannot scale {adapter_dir} by λ: {e}") from None
    if not (adapter_dir / WEIGHTS).exists():
        adapter.files.close()
        raise ConfigError(f"{adapter_dir} has no {WEIGHTS}; re-save the adapter with safetensors to scale it by λ")
    full = sorted(adapter.full.values())
    if full:
        adapter.files.close()
        raise ConfigError(
            f"{adapter_dir / WEIGHTS} saves full tensor(s) ({', '.join(full[:3])}) besides the LoRA factors "
            "(modules_to_save or resized embeddings); base + scaled adapter is not a merge for them: "
            "run `safemerge merge` to write each merged model instead"
        )
    return adapter.files


def scaled(key: str, tensor: torch.Tensor, lam: float) -> torch.Tensor:
    if LORA_B.fullmatch(key):
        return tensor.float().mul(lam).contiguous()
    if LORA_A.fullmatch(key):
        return tensor.contiguous()
    raise ConfigError(f"tensor {key} is neither lora_A nor lora_B; only plain LoRA adapters can be scaled by λ")


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank in an adapter (rank_pattern included): what vLLM's max_lora_rank must cover."""
    config = load_json(Path(adapter_dir) / "adapter_config.json")
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return int(max(ranks))


def adapter_fingerprint(adapter_dir: Path) -> str:
    adapter = open_adapter(Path(adapter_dir), str(adapter_dir), allow_pickle=False)
    try:
        return adapter.fingerprint()
    finally:
        adapter.files.close()


def describe(lam: float) -> str:
    """A stable name for the adapter scaled by λ (directory and LoRA request name)."""
    return f"lambda-{lam:.6g}"
