"""Time greedy generation with and without the KV cache, on a GPU, for train_configs presets; prints one markdown
table.

    python -m tools.bench.bench_generate [--configs llama_134m_memory,llama_1.3b_memory] [--prompts 64]
        [--new-tokens 64] [--batch-size 32] [--prompt-lengths 8,48]

Each config's model is built as its preset says (random weights: speed does not depend on them), in bf16 autocast.
The prompts are random token strings, their lengths drawn from --prompt-lengths. Without the cache, only prompts of
equal length batch together (the generator as it was before the cache): on mixed lengths the speed-up is the cache's
and the batching's together; equal lengths (e.g. 32,32) give the cache's alone. Both decoders run the same prompts; the
table gives new tokens per second, the speed-up, and the share of prompts whose greedy continuations agree token for
token (both paths compute in bf16 with different kernels, so near-ties may break differently; in float64 they agree
exactly, which tests/test_kv_cache.py checks).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from titanmem.build import build_model
from titanmem.config import build_config
from titanmem.eval.decode import generate
from titanmem.plan import resolve_plan

VOCAB = 4097  # the bundled tokenizer's ids; the last, 4096, is end-of-text
EOS = VOCAB - 1


def timed(model, prompts, args, use_cache: bool) -> tuple[list[list[int]], float]:
    # Choosing among the ids below end-of-text: every prompt generates all its new tokens, so both paths do the same
    # work.
    common = dict(max_new_tokens=args.new_tokens, eos_id=EOS, device=torch.device("cuda"),
                  batch_size=args.batch_size, autocast_dtype=torch.bfloat16, vocab_size=EOS, use_cache=use_cache)
    # A whole untimed pass first: the Triton kernels compile once per shape class they meet, and the timed pass must
    # meet no new one.
    generate(model, prompts, **common)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = generate(model, prompts, **common)
    torch.cuda.synchronize()
    return outputs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="llama_134m_memory,llama_1.3b_memory")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-lengths", default="8,48", help="shortest,longest prompt in tokens")
    args = parser.parse_args()
    try:
        shortest, longest = (int(part) for part in args.prompt_lengths.split(","))
    except ValueError:
        shortest, longest = 0, -1
    if not 1 <= shortest <= longest:
        sys.exit(f"error: --prompt-lengths {args.prompt_lengths!r}: give two token counts, e.g. 8,48 (1 <= first <= "
                 "second)")
    if not torch.cuda.is_available():
        sys.exit("error: bench_generate.py times a GPU; none is visible")
    rng = random.Random(0)
    prompts = [[rng.randrange(EOS) for _ in range(rng.randint(shortest, longest))] for _ in range(args.prompts)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| config | prompts × new tokens | prompt lengths | without cache tok/s | with cache tok/s | speed-up "
          "| same continuation |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.configs.split(","):
        config, _ = build_config(["--job.config_file", f"train_configs/{name}.toml"])
        plan = resolve_plan(config, "dry_run", world_size=1, device_type="cuda", tokenizer_vocab_size=VOCAB)
        model = build_model(plan.model_args, torch.device("cuda")).eval()
        uncached, slow = timed(model, prompts, args, use_cache=False)
        cached, fast = timed(model, prompts, args, use_cache=True)
        new = sum(len(tokens) for tokens in cached)
        same = sum(a == b for a, b in zip(cached, uncached)) / len(prompts)
        print(f"| {name} | {args.prompts} × {args.new_tokens} | {shortest}–{longest} | {new / slow:,.0f} | "
              f"{new / fast:,.0f} | {slow / fast:.1f}× | {same:.0%} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
