"""Autoregressive decoding for eval and `python -m titanmem.generate`: greedy or nucleus (top-p) sampling.

Prompts of any lengths batch together: each batch is left-padded to its longest prompt, and a KV cache
(`titanmem.models.kv_cache`) keeps every attention layer's keys and values, so a new token costs one forward over
one position. `use_cache=False` re-runs the whole prefix for every new token instead, batching only prompts of equal
length: the plain reference the cached path is tested against. Under a sharded model every rank must call this with
the same prompts: the forward passes are collective.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from titanmem.models.kv_cache import KVCache
from titanmem.utils import autocast


def pick_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: the argmax at temperature 0, else a sample from the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass before it is below top_p: the most likely token is always kept.
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    device: torch.device,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    sequence_multiple: int = 1,
) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; cut after the first end-of-text token, which is dropped).
    `vocab_size` limits the choice to the tokenizer's ids (the model's output is padded beyond them). `progress`, if
    given, is called with (prompts done, prompts) after each batch. `sequence_multiple`: every forward covers a
    multiple of this many tokens (the tensor-parallel degree, whose sequence parallel splits the tokens), with filler
    where needed; it needs the cache."""
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
    if sequence_multiple > 1 and not use_cache:
        raise ValueError("decoding without the KV cache cannot pad a sequence-parallel model's tokens")
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return outputs
    batches = _cached_batches(prompts, batch_size) if use_cache else _equal_length_batches(prompts, batch_size)
    decode = _decode_cached if use_cache else _decode_uncached
    done = 0
    # Compiled blocks run eagerly here: decoding's changing shapes would only make them recompile.
    with torch.compiler.set_stance("force_eager"):
        for batch in batches:
            new_tokens = decode(model, [prompts[i] for i in batch], max_new_tokens, eos_id, device, temperature,
                                top_p, generator, autocast_dtype, vocab_size, sequence_multiple)
            for index, new in zip(batch, new_tokens):
                outputs[index] = new[: new.index(eos_id)] if eos_id in new else new
            done += len(batch)
            if progress is not None:
                progress(done, len(prompts))
    return outputs


def _cached_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar lengths (sorted by length, so that little padding is needed)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _equal_length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    return [members[start : start + batch_size] for length in sorted(by_length)
            for members in [by_length[length]] for start in range(0, len(members), batch_size)]


def _next_tokens(logits, finished, eos_id, temperature, top_p, generator):
    next_tokens = pick_next_token(logits, temperature, top_p, generator)
    return torch.where(finished, torch.full_like(next_tokens, eos_id), next_tokens)


def _decode_cached(model, prompts, max_new_tokens, eos_id, device, temperature, top_p, generator, autocast_dtype,
                   vocab_size, multiple) -> list[list[int]]:
    real_longest = max(len(prompt) for prompt in prompts)
    longest = -(-real_longest // multiple) * multiple
    # Left padding puts every row's last prompt token in the same column; the padding id is masked out.
    rows = [[eos_id] * (longest - len(prompt)) + prompt for prompt in prompts]
    tokens = torch.tensor(rows, dtype=torch.long, device=device)
    pad = torch.tensor([longest - len(prompt) for prompt in prompts], dtype=torch.long, device=device)
    # The last new token is picked but never fed back: it needs no room.
    cache = KVCache(pad, longest + (max_new_tokens - 1) * multiple, row_tokens=real_longest + max_new_tokens - 1)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    column = -1  # where the token to pick from sits in the forward's output: the last prompt token, then the first
    for _ in range(max_new_tokens):
        with autocast(device, autocast_dtype):
            logits = model(tokens, cache=cache)[:, column, :vocab_size].float()
        new = _next_tokens(logits, finished, eos_id, temperature, top_p, generator)[:, None]
        generated.append(new)
        finished |= new[:, 0] == eos_id
        if bool(finished.all()):
            break
        tokens, column = new, 0
        if multiple > 1:
            tokens = torch.cat([new, new.new_full((len(prompts), multiple - 1), eos_id)], dim=1)
            cache.mark_filler(cache.length + 1, cache.length + multiple)
    return torch.cat(generated, dim=1).tolist()


def _decode_uncached(model, prompts, max_new_tokens, eos_id, device, temperature, top_p, generator, autocast_dtype,
                     vocab_size, multiple) -> list[list[int]]:
    length = len(prompts[0])
    tokens = torch.tensor(prompts, dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        with autocast(device, autocast_dtype):
            logits = model(tokens)[:, -1, :vocab_size].float()
        next_tokens = _next_tokens(logits, finished, eos_id, temperature, top_p, generator)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == eos_id
        if bool(finished.all()):
            break
    return tokens[:, length:].tolist()
