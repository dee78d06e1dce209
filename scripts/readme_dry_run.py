"""The README's dry run of the paper's setup, from the real AdvBench, XSTest and GSM8K files.

    python scripts/readme_dry_run.py [--data ../shared/data]    # print it and write it into README.md

The plan depends only on the sets, the methods and whether each fine-tune is a LoRA adapter, so the aligned
model is a tiny random Llama and the three seeds are rank-16 LoRA stand-ins; the validation split is 10% of
GSM8K's training set, as `safemerge finetune --val-fraction 0.1` keeps it. HEx-PHI is gated and left out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from readme_blocks import replace_block


def stand_ins(work: Path) -> tuple[Path, list[Path]]:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    model.save_pretrained(work / "aligned")
    seeds = []
    for seed in range(3):
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.get_peft_model(LlamaForCausalLM(model.config), config).save_pretrained(work / f"seed{seed}")
        seeds.append(work / f"seed{seed}")
    return work / "aligned", seeds


def validation_split(data: Path, work: Path) -> Path:
    rows = [json.loads(line) for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines() if line.strip()]
    val = work / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": r["question"], "response": r["answer"]}) + "\n"
                           for r in rows[:round(0.1 * len(rows))]))
    return val


def dry_run(data: Path, work: Path) -> str:
    aligned, seeds = stand_ins(work)
    val = validation_split(data, work)
    args = ["sweep", "--aligned", str(aligned), "--finetuned", *map(str, seeds), "--out", str(work / "run"),
            "--methods", "linear,slerp,dare_linear,model_stock", "--lambdas", "0.2,0.4,0.6,0.8",
            "--safety", f"advbench:{data / 'advbench' / 'harmful_behaviors.csv'}",
            "--safety", f"xstest:{data / 'xstest' / 'xstest_prompts.csv'}", "--judge", "wildguard",
            "--task-val", f"file:{val}:numeric", "--task-test", f"gsm8k:{data / 'gsm8k' / 'test.jsonl'}",
            "--device", "cuda", "--backend", "vllm", "--max-new-tokens", "512", "--dry-run"]
    run = subprocess.run([sys.executable, "-m", "safemerge", *args], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    return run.stdout.replace(str(val), "val.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="safemerge-dry-run-") as work:
        text = dry_run(args.data.resolve(), Path(work))
    print(text, end="")
    replace_block("paper-dry-run", "```\n" + text + "```")


if __name__ == "__main__":
    main()
