"""Peak memory of every merge method with Gemma 3's 262,144-token vocabulary, against the same model
with a 32,768-token one: what the large vocabulary adds to a merge's peak RSS.

The models are synthetic bfloat16 checkpoints shaped like Gemma 3 270M (Gemma3ForCausalLM text config:
hidden 640, 4 heads of 256 with 1 KV head, intermediate 2048, tied embeddings, so no lm_head), with 4 of
its 18 layers: the embedding matrix (262,144 × 640, 335 MB in bf16, 671 MB in fp32) is most of the model,
as in the real one. Each merge runs as its own `safemerge merge ... --quiet` subprocess (model_stock on
aligned + two fine-tuned seeds); its wall time and peak RSS (ru_maxrss from os.wait4) are printed, with
the difference between the two vocabularies beside the embedding's size. Figures are printed, never
asserted; models are built once into benchmarks/_work/ and reused (~3 GB of disk).

    python benchmarks/bench_vocab.py
    python benchmarks/bench_vocab.py --methods linear,ties
    python benchmarks/bench_vocab.py --readme   # also write the README's table (all methods only)
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import (  # noqa: E402  (the helpers of the merge benchmark: same builds, same measurement)
    LAMBDA,
    cli,
    ensure,
    environment,
    method_params,
    model_tensor,
    run_child,
    settle,
    shard_groups,
    write_json,
)

HERE = Path(__file__).resolve().parent
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 640, 2048, 4, 1, 256, 4
VOCABS = (262_144, 32_768)  # Gemma 3's, and a Llama-2-sized one for comparison
SPEC_VERSION = 1


def gemma3_tensors(vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Gemma 3 text checkpoint (tied: the embedding is the LM head)."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = [("model.embed_tokens.weight", (vocab, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, HIDDEN)), (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.v_proj.weight", (kv, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, q)),
                (p + "self_attn.q_norm.weight", (HEAD_DIM,)), (p + "self_attn.k_norm.weight", (HEAD_DIM,)),
                (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
        out += [(p + f"{norm}.weight", (HIDDEN,)) for norm in ("input_layernorm", "post_attention_layernorm",
                                                              "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    return out + [("model.norm.weight", (HIDDEN,))]


def gemma3_config(vocab: int) -> dict:
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "dtype": "bfloat16",
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": vocab,
            "tie_word_embeddings": True, "sliding_window": 512, "max_position_embeddings": 32768,
            "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}


def build_gemma3(tmp: Path, vocab: int, seed: int | None) -> None:
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    groups = shard_groups(gemma3_tensors(vocab))
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: model_tensor(name, shape, seed) for name, shape in group}
        save_file(shard, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(tmp / "config.json", gemma3_config(vocab))
    write_json(tmp / "tokenizer_config.json", {"model_max_length": 32768, "bos_token": "<bos>", "eos_token": "<eos>"})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=HERE / "_work", help="where models are built and merged")
    p.add_argument("--rebuild", action="store_true", help="rebuild the models even if a matching build exists")
    p.add_argument("--methods", default="", help="comma list of methods (default all)")
    p.add_argument("--readme", action="store_true", help="write the table into README.md's bench-vocab block")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        env = pool.submit(environment).result()
        models = {}
        for vocab in VOCABS:
            for seed in (None, 0, 1):
                name = f"gemma3-v{vocab}-" + ("aligned" if seed is None else f"seed{seed}")
                spec = {"version": SPEC_VERSION, "vocab": vocab, "layers": LAYERS, "seed": seed, "lambda": LAMBDA}
                models[vocab, seed] = ensure(pool, workdir / name, spec, build_gemma3, vocab, seed, rebuild=args.rebuild)
    methods = [m for m in env["methods"] if not args.methods or m in args.methods.split(",")]
    rows = []
    for method in methods:
        info, peaks = env["methods"][method], {}
        for vocab in VOCABS:
            inputs = [models[vocab, None], models[vocab, 0]] + ([models[vocab, 1]] if info["min_models"] > 1 else [])
            settle(inputs)
            out = workdir / "out" / f"vocab-{method}"
            wall, rss, status = run_child([*cli(), "merge", *map(str, inputs), "--out", str(out), "--method", method,
                                           *method_params(info["takes"]), "--quiet"], workdir / "merge.log")
            if status != 0:
                sys.exit(f"{method} failed on vocab {vocab}: see {workdir / 'merge.log'}")
            shutil.rmtree(out, ignore_errors=True)
            peaks[vocab] = (wall, rss)
        rows.append((method, peaks))
    lines = table(env, rows)
    print("\n" + "\n".join(lines))
    if args.readme:
        if args.methods:
            sys.exit("--readme writes the table of every method; drop --methods")
        sys.path.insert(0, str(HERE.parent / "scripts"))
        from readme_blocks import replace_block

        replace_block("bench-vocab", "\n".join(lines))


def table(env: dict, rows) -> list[str]:
    big, small = VOCABS
    embed_bf16 = (big - small) * HIDDEN * 2 / 1e6
    lines = [f"safemerge {env['safemerge']}, torch {env['torch']}; Gemma 3 shape, {LAYERS} layers, tied embeddings; "
             f"the larger vocabulary adds {(big - small) * HIDDEN / 1e6:.0f} M embedding values: {embed_bf16:.0f} MB "
             f"in bf16, {2 * embed_bf16:.0f} MB in fp32", "",
             f"| method | vocab {small:,}: s, peak RSS MB | vocab {big:,}: s, peak RSS MB | RSS added, MB |"
             " added / bf16 embedding rows |", "|---|---:|---:|---:|---:|"]
    for method, peaks in rows:
        (ws, rs), (wb, rb) = peaks[small], peaks[big]
        lines.append(f"| {method} | {ws:.2f}, {rs:.0f} | {wb:.2f}, {rb:.0f} | {rb - rs:.0f} | "
                     f"{(rb - rs) / embed_bf16:.2f}× |")
    return lines


if __name__ == "__main__":
    main()
