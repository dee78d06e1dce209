"""Generation benchmark: the transformers backend's throughput on CPU, batched against one
prompt at a time, on a small random Llama (hidden 512, 4 layers, vocab 8192; ~25 M parameters).

Every prompt is a chat request of 20-120 words through the model's chat template; each response
is exactly --new-tokens long (the stop token is one the random model cannot reach), so both
runs produce the same number of tokens and only the batching differs. Greedy decoding, as in the
safety evaluation. The figures are printed, never asserted.

    python benchmarks/bench_generation.py
    python benchmarks/bench_generation.py --prompts 64 --batch-sizes 1,8,16,32 --new-tokens 64
    python benchmarks/bench_generation.py --readme   # also write the README's table (default settings only)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the stop token's logit is 0, never the largest of 8192: responses have full length
        model.lm_head.weight[2].zero_()
    return model, tokenizer


def main() -> None:
    from safemerge.backends.generation import GenerationSettings, Request, TransformersBackend

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md's bench-generation block")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    model, tokenizer = build(8192)
    rng = random.Random(0)
    requests = [Request(str(i), messages=({"role": "user", "content": " ".join(f"w{rng.randrange(8000)}" for _ in
                                                                                   range(rng.randint(20, 120)))},),
                        system="You are a helpful assistant.") for i in range(args.prompts)]
    settings = GenerationSettings(max_new_tokens=args.new_tokens, repetition_penalty=1.2)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: Llama, {params:.1f} M parameters, float32, {torch.get_num_threads()} threads; "
          f"{args.prompts} prompts, {args.new_tokens} new tokens each, greedy, repetition penalty 1.2")
    print(f"{'batch size':>10} {'seconds':>8} {'prompts/s':>10} {'tokens/s':>9} {'speed-up':>9}")
    base = None
    outputs = {}
    rows = ["| batch size | seconds | prompts/s | tokens/s | speed-up |", "|---:|---:|---:|---:|---:|"]
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        backend = TransformersBackend(model, tokenizer, model_id="bench", batch_size=batch_size)
        backend.generate(requests[:2], GenerationSettings(max_new_tokens=2))  # warm-up
        start = time.perf_counter()
        completions = backend.generate(requests, settings)
        seconds = time.perf_counter() - start
        tokens = sum(c.completion_tokens for c in completions)
        assert tokens == args.prompts * args.new_tokens, "every response should have full length"
        outputs[batch_size] = [c.response for c in completions]
        base = base or seconds
        print(f"{batch_size:>10} {seconds:>8.2f} {args.prompts / seconds:>10.2f} {tokens / seconds:>9.1f} "
              f"{base / seconds:>8.2f}x")
        rows.append(f"| {batch_size} | {seconds:.2f} | {args.prompts / seconds:.2f} | {tokens / seconds:.0f} | "
                    f"{base / seconds:.2f}× |")
    same = sum(a == b for a, b in zip(outputs[min(outputs)], outputs[max(outputs)]))
    print(f"responses identical between batch sizes {min(outputs)} and {max(outputs)}: {same}/{args.prompts}")
    if args.readme:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
        from readme_blocks import replace_block

        replace_block("bench-generation", "\n".join(rows) + f"\n\nThe responses are identical at batch sizes "
                      f"{min(outputs)} and {max(outputs)} ({same}/{args.prompts}).")


if __name__ == "__main__":
    main()
