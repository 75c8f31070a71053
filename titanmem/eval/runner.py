"""Evaluation of a model in training or from a checkpoint: held-out perplexity and factual recall.

Results go to `results.jsonl` in the results folder (one JSON object per evaluation, with per-relation detail): in
training `<job.dump_folder>/eval`, and TensorBoard under `eval/`; from a checkpoint, `eval.results_folder`, if set.
Fact recall is reported as `eval/recall/<split>/<phrasing>`: the share of facts answered exactly by greedy completion
of the first training template's prompt (`train`), of the Q/A template's (`qa`) and of the held-out prompts
(`heldout`, averaged over them). The splits are `seen` and `unseen` (the guessing floor), and the seen facts again
as `seen_qa` (also trained as Q/A pairs) and `seen_stated` (stated only: their `qa` recall is the transfer from
statements to questions).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from titanmem.config.errors import ConfigError
from titanmem.config.manager import resolve_asset_path
from titanmem.config.sections import JobConfig
from titanmem.data.files import suffix_builder
from titanmem.data.records import bad_record_error, document_records
from titanmem.data.tokenizer import Tokenizer
from titanmem.eval.decode import generate
from titanmem.data.facts import RELATIONS, Fact, load_facts
from titanmem.eval.facts import is_exact_match
from titanmem.eval.telemetry import memory_layer_names
from titanmem.utils import autocast

logger = logging.getLogger(__name__)


def sample_facts(facts: list[Fact], limit: int) -> list[Fact]:
    """A fixed sample of `limit` facts (all when 0 or more than there are), the same at every call: half seen and half
    unseen, as far as there are, and within each half an equal share per relation (a relation with fewer facts gives
    all of them and leaves the rest to the others), so that no relation dominates the sample and every relation's
    guessing floor is measured on as many unseen facts as the half allows."""
    if limit == 0 or limit >= len(facts):
        return list(facts)
    halves = [[f for f in facts if f.seen], [f for f in facts if not f.seen]]
    quotas = water_fill([len(half) for half in halves], limit)
    rng = random.Random(0)
    sample: list[Fact] = []
    for half, quota in zip(halves, quotas):
        by_relation: dict[str, list[Fact]] = defaultdict(list)
        for fact in sorted(half, key=lambda f: (f.relation, f.subject)):
            by_relation[fact.relation].append(fact)
        names = sorted(by_relation)
        for name, count in zip(names, water_fill([len(by_relation[n]) for n in names], quota)):
            sample.extend(rng.sample(by_relation[name], count))
    return sorted(sample, key=lambda f: (f.relation, f.subject))


def water_fill(sizes: list[int], total: int) -> list[int]:
    """Counts that sum to min(total, sum(sizes)), none above its size, handed out in rounds: each round splits what is
    left equally over the groups not yet full (the first of them taking the remainder). No group gets less than
    min(its size, total // groups). Not always the most even split: a group that takes a remainder share in an
    early round keeps it ([1, 3, 2] of 5 gives [1, 3, 1], not [1, 2, 2]). The eval sample of the [quality] protocol
    (docs/experiments.md) was drawn with these counts, so they stay as they are."""
    counts = [0] * len(sizes)
    left, open_groups = total, [i for i, size in enumerate(sizes) if size > 0]
    while left > 0 and open_groups:
        share, extra = divmod(left, len(open_groups))
        for rank, i in enumerate(open_groups):
            take = min(sizes[i] - counts[i], share + (rank < extra))
            counts[i] += take
            left -= take
        open_groups = [i for i in open_groups if counts[i] < sizes[i]]
    return counts


def heldout_tokens(path: str, tokenizer: Tokenizer, count: int, text_field: str = "text") -> list[int]:
    """The first `count` + 1 tokens of the held-out documents, EOS-separated (fewer if the file is shorter). A
    .jsonl/.json file holds one document per line, in `text_field`; any other file is one document. A bad record
    stops with its line and reason: a held-out set is small and must be scored whole."""
    resolved = resolve_asset_path(path)
    if not resolved.is_file():
        raise ConfigError("eval.perplexity_path", f"no such file: {path}")
    builder = "json" if suffix_builder(resolved.name) == "json" else "text"
    tokens: list[int] = []
    for record in document_records(resolved, builder, text_field):
        if record.problem is not None:
            raise bad_record_error(record.description, "eval.perplexity_path")
        tokens.extend(tokenizer.encode(record.value or ""))
        tokens.append(tokenizer.eos_id)
        if len(tokens) > count:
            break
    return tokens[: count + 1]


class Progress:
    """Logs how far a long eval phase has come and an estimate of the time left, at most every `interval` seconds
    (on rank 0); a phase that ends within the first interval logs nothing."""

    def __init__(self, label: str, unit: str, enabled: bool, interval: float = 30.0, clock=time.monotonic):
        self.label, self.unit, self.enabled, self.interval, self.clock = label, unit, enabled, interval, clock
        self.started = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if not self.enabled or now - self.last < self.interval or done >= total:
            return
        self.last = now
        left = (now - self.started) * (total - done) / max(done, 1)
        logger.info("%s: %s / %s %s, %s left", self.label, f"{done:,}", f"{total:,}", self.unit,
                    datetime.timedelta(seconds=round(left)))


class Evaluator:
    def __init__(self, config: JobConfig, tokenizer: Tokenizer, device: torch.device,
                 autocast_dtype: torch.dtype | None, rank: int = 0, results_folder: str | Path | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.rank = rank
        # None: results are returned (and logged), never written.
        self.folder = Path(results_folder) if results_folder else None
        self.tokens = heldout_tokens(config.eval.perplexity_path, tokenizer, config.eval.perplexity_tokens,
                                     config.data.text_field)
        facts_path = resolve_asset_path(config.data.facts_path)
        self.facts = sample_facts(load_facts(facts_path), config.eval.facts_limit) if facts_path.is_file() else []

    @torch.no_grad()
    def perplexity(self, model: torch.nn.Module, step: int | None = None) -> tuple[float, int]:
        """Mean next-token loss over non-overlapping windows of training.seq_len, and the tokens scored."""
        seq_len = self.config.training.seq_len
        windows = (len(self.tokens) - 1) // seq_len
        if windows == 0:
            raise ValueError(f"eval.perplexity_path holds {len(self.tokens)} tokens, fewer than one window of {seq_len}")
        data = torch.tensor(self.tokens[: windows * seq_len + 1], dtype=torch.long)
        inputs = data[:-1].view(windows, seq_len)
        labels = data[1:].view(windows, seq_len)
        total, count = 0.0, 0
        batch = self.config.eval.batch_size
        progress = Progress(f"eval step {step}: perplexity", "windows", self.rank == 0)
        for start in range(0, windows, batch):
            progress(start, windows)
            x = inputs[start : start + batch].to(self.device)
            y = labels[start : start + batch].to(self.device)
            with autocast(self.device, self.autocast_dtype):
                logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
        return total / count, count

    @torch.no_grad()
    def recall(self, model: torch.nn.Module, step: int | None = None) -> dict:
        """Exact-match recall of the sampled facts, by split and phrasing, overall and per relation."""
        prompts, keys = [], []
        for fact in self.facts:
            relation = RELATIONS[fact.relation]
            prompts += [relation.training_prompt(fact.subject), relation.qa_prompt(fact.subject)]
            keys += [(fact, "train"), (fact, "qa")]
            for prompt in relation.heldout(fact.subject):
                prompts.append(prompt)
                keys.append((fact, "heldout"))
        completions = generate(
            model, [self.tokenizer.encode(p) for p in prompts], self.config.eval.max_new_tokens,
            self.tokenizer.eos_id, self.device, batch_size=self.config.eval.batch_size,
            autocast_dtype=self.autocast_dtype, vocab_size=self.tokenizer.vocab_size,
            progress=Progress(f"eval step {step}: recall", "prompts", self.rank == 0),
            use_cache=self.config.eval.kv_cache, sequence_multiple=self.config.parallelism.tp,
        )
        hits: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
        for (fact, phrasing), completion in zip(keys, completions):
            correct = is_exact_match(self.tokenizer.decode(completion), fact.answer)
            splits = ["seen", "seen_qa" if fact.qa else "seen_stated"] if fact.seen else ["unseen"]
            for split in splits:
                hits[(split, phrasing, "all")].append(correct)
                hits[(split, phrasing, fact.relation)].append(correct)
        return {f"{split}/{phrasing}/{relation}": sum(v) / len(v) for (split, phrasing, relation), v in
                sorted(hits.items())}

    def run(self, model: torch.nn.Module, step: int) -> dict:
        """Evaluate `model` (left in train mode afterwards); on rank 0, append the results to results.jsonl and
        return them (scalars for TensorBoard under `eval/`)."""
        was_training = model.training
        model.eval()
        values = getattr(model, "memory_values", None)
        # The training's observer (memory telemetry) counts training reads only: eval prompts, their padding
        # included, are no part of how training uses the table.
        training_observer = values.observer if values is not None else None
        if values is not None:
            values.observer = None
        try:
            dump = self._start_dump(model) if self.config.eval.dump_memory else None
            try:
                loss, scored = self.perplexity(model, step)
            finally:
                if dump is not None:
                    values.observer = None
            if dump is not None:
                self._save_dump(dump, step)
            recall = self.recall(model, step) if self.facts else {}
        finally:
            if values is not None:
                values.observer = training_observer
            model.train(was_training)
        results = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens_scored": scored,
                   "facts_asked": len(self.facts), "recall": recall}
        if self.rank == 0:
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.folder / "results.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(results) + "\n")
            summary = " | ".join(f"{k.replace('/all', '')} {v:.1%}" for k, v in recall.items() if k.endswith("/all"))
            logger.info("eval step %d | loss %.4f | perplexity %.2f%s", step, loss, results["perplexity"],
                        f" | recall {summary}" if summary else "")
        return results

    def scalars(self, results: dict) -> dict[str, float]:
        scalars = {"eval/loss": results["loss"], "eval/perplexity": results["perplexity"]}
        scalars.update({f"eval/recall/{k.removesuffix('/all')}": v for k, v in results["recall"].items()
                        if k.endswith("/all")})
        return scalars

    def _start_dump(self, model: torch.nn.Module) -> dict | None:
        values = getattr(model, "memory_values", None)
        if values is None:
            return None
        names = memory_layer_names(model)
        dump: dict = {"indices": defaultdict(list), "weights": defaultdict(list)}

        def observe(layer, indices, weights):
            dump["indices"][names[id(layer)]].append(indices.detach().to("cpu", torch.int32))
            dump["weights"][names[id(layer)]].append(weights.detach().float().cpu())

        values.observer = observe
        return dump

    def _save_dump(self, dump: dict, step: int) -> None:
        """Per layer: the selected rows [tokens, heads·knn] and their softmax weights (the normalised scores)."""
        if self.rank != 0 or self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"indices": {k: torch.cat(v) for k, v in dump["indices"].items()},
                    "weights": {k: torch.cat(v) for k, v in dump["weights"].items()},
                    "tokens": torch.tensor(self.tokens, dtype=torch.int32)},
                   self.folder / f"memory-step-{step}.pt")
