"""Load a model to generate with: a model directory, a Hub id or a LoRA adapter of one, with
its tokenizer and chat template, on the chosen device, identified by its content fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safemerge.checkpoints.lora import LoraAdapter
from safemerge.checkpoints.readers import open_source, tokenizer_files
from safemerge.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel, in eval mode
    tokenizer: object
    fingerprint: str  # content fingerprint of the weights generated with
    spec: str
    device: str
    dtype: str
    chat_template: str  # "model" or the path of a template given by the user


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown --device {device}; use auto, cpu or cuda")
    return device


def pick_dtype(dtype: str, device: str):
    """auto: float32 on CPU (bfloat16 matmuls are slow there), bfloat16 on GPUs that have it."""
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype {dtype}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def load_model(spec: str, *, device: str = "auto", dtype: str = "auto", chat_template: Path | None = None,
               require_chat_template: bool = True, allow_pickle: bool = False) -> LoadedModel:
    """A LoRA adapter is applied to its base model and merged in (faster generation); its
    fingerprint is then that of the base weights plus the adapter's files."""
    source = open_source(spec, allow_pickle=allow_pickle)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if isinstance(source, LoraAdapter):
        base_spec = source.config.get("base_model_name_or_path")
        if not base_spec:
            raise ConfigError(f"{source.path}/adapter_config.json names no base_model_name_or_path; merge the adapter first")
        base = open_source(base_spec, allow_pickle=allow_pickle)
        fingerprint = f"{base.fingerprint()}+lora:{source.fingerprint()}"
        model = from_pretrained(base.path, torch_dtype, allow_pickle)
        model = apply_adapter(model, source.path)
        tokenizer_dir = source.path if tokenizer_files(source.path) else base.path
    else:
        fingerprint = source.fingerprint()
        model = from_pretrained(source.path, torch_dtype, allow_pickle)
        tokenizer_dir = source.path
    tokenizer = load_tokenizer(tokenizer_dir, spec, chat_template, require_chat_template)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, fingerprint, spec, device, str(torch_dtype).removeprefix("torch."),
                       str(chat_template) if chat_template else "model")


def from_pretrained(path: Path, dtype, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=not allow_pickle,
                                                    trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None


def apply_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def load_tokenizer(directory: Path, spec: str, chat_template: Path | None, require_chat_template: bool = True):
    from transformers import AutoTokenizer

    if not tokenizer_files(directory):
        raise ConfigError(f"{spec} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                          "copy them from the model it was trained from")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {spec}: {str(e).splitlines()[0]}") from None
    if chat_template is not None:
        try:
            tokenizer.chat_template = Path(chat_template).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --chat-template {chat_template}: {e.strerror}") from None
    if require_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"{spec} has no chat template; give one with --chat-template FILE (a Jinja template)")
    return tokenizer
