"""One dataclass per TOML section.

The string literal under each field is its documentation: `--help` prints it, and a test checks that every field has
one. Constraints live in `field(metadata=...)` (see `bounded`) so the parser can check them and name the field in its
error; constraints that relate several fields live in each section's `check()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from titanmem.config.errors import ConfigError
from titanmem.registry import DATA_FORMATS, EXPORT_FORMATS, KEY_SEARCHES, LOOKUPS, LR_DECAYS, VALUE_OPTIMIZERS, Kind


def bounded(default, *, ge=None, gt=None, le=None, lt=None, allow=()):
    """A dataclass field whose numeric value must lie in a range; values in `allow` (sentinels like -1) pass too."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "allow": tuple(allow)})


def registered(kind: Kind, default: str):
    """A dataclass field that names an entry of a registry kind (`titanmem.registry`): its choices are the kind's
    names when the value is checked, so an entry registered at run time is accepted too."""
    return field(default=default, metadata={"kind": kind})


@dataclass
class Job:
    config_file: str = ""
    """TOML file whose values override the defaults; command-line `--section.key` overrides win over it."""

    dump_folder: str = "./outputs"
    """Folder for everything a run writes: checkpoints, TensorBoard events, the resolved config."""

    description: str = ""
    """Free text printed at start, to tell runs apart in logs."""


@dataclass
class Model:
    name: Literal["llama"] = "llama"
    """Model family. `llama` is a pre-norm decoder: RMSNorm, RoPE, GQA attention, SwiGLU FFN."""

    flavor: str = "debug"
    """Named shape from the flavor registry (`titanmem.models.flavors`), e.g. debug, 134m, 373m, 720m, 1.3b, 8b."""

    vocab_size: int = bounded(-1, gt=0, allow=(-1,))
    """Embedding rows. -1 takes the tokenizer's size rounded up to a multiple of 64, which keeps the output GEMM
    tensor-core aligned; a set value must be at least the tokenizer's size."""


@dataclass
class Tokenizer:
    path: str = "assets/tokenizer/titanmem4k.tiktoken"
    """Local tiktoken ranks file (`base64(token) rank` lines). A `<stem>.json` beside it may give `pat_str` and
    `special_tokens`. Or a Hugging Face byte-level BPE tokenizer.json (Llama 3's, or a titanmem hf export's).
    Relative paths are tried against the working directory, then the titanmem checkout."""

    name: str = ""
    """Named tiktoken encoding (e.g. `cl100k_base`), used only when `path` is empty. Needs the encoding's file to be
    reachable or already in tiktoken's cache."""

    eos_token: str = "<|endoftext|>"
    """Special token appended after every document when packing."""


@dataclass
class Data:
    path: str = "assets/corpus/train.jsonl.gz"
    """Training text: a local file, directory or glob (json/jsonl/parquet/txt, optionally .gz), or a hub dataset name
    when online. Relative paths are resolved like `tokenizer.path`."""

    format: str = registered(DATA_FORMATS, "auto")
    """How to read `path`. `auto` infers it from the file extension; a path that does not exist locally is a hub
    name."""

    hub_config: str = ""
    """Configuration name of a hub dataset (the second argument of `datasets.load_dataset`)."""

    split: str = "train"
    """Dataset split to read."""

    text_field: str = "text"
    """Column holding each document's text."""

    streaming: bool = False
    """Stream the dataset instead of loading it into an Arrow table. Use it for corpora larger than local disk."""

    num_workers: int = bounded(0, ge=0)
    """Data-loader worker processes that tokenize in the background. 0 tokenizes in the training process."""

    on_reshard: Literal["continue", "restart"] = "continue"
    """When a resume changes the number of shards that read the data (data-parallel ranks × loader workers):
    `continue` deals the saved position out to the new shards, so that the global stream goes on with no document
    skipped or repeated (the saved shards' unfinished windows included); `restart` starts the data order afresh, so
    documents repeat. A streamed dataset (`streaming`) cannot continue on another shard count and asks for
    `restart`."""

    on_bad_record: Literal["stop", "skip"] = "stop"
    """What a bad record in the training data does: a line that is not UTF-8 or not JSON, a truncated last line, a
    record with no `text_field` or a non-string one, a text file that is not UTF-8, a damaged compressed file. `stop`
    ends the run with the file, line and reason; `skip` leaves the record out and counts it in the log. Local files are
    read in full before the model is built (a streamed corpus: its first file, up to 10,000 records; the rest as it
    is read)."""

    facts_path: str = "assets/facts/facts.jsonl.gz"
    """Facts to mix into training (JSON lines of relation, subject, answer, seen and optionally qa; the bundled file
    is built by `python -m tools.assets.build_assets`). Only the `seen` facts are trained on; the factual-recall eval
    asks about all of them. Used when `facts_fraction` > 0, and by the eval."""

    facts_fraction: float = bounded(0.0, ge=0.0, lt=1.0)
    """Share of the training tokens that are fact text: after each document, statements of random seen facts, in
    random training templates, one per line, follow as a document of their own. 0 trains on the corpus alone."""

    facts_qa_share: float = bounded(0.25, ge=0.0, lt=1.0)
    """Share of the fact text's items that are question-answer pairs ("Q: What is the capital of Botswana?\nA:
    Gaborone.") of the seen facts marked `qa`; the other items are statements of any seen fact. 0 trains statements
    only. Ignored when no fact is marked `qa`."""


@dataclass
class Memory:
    enabled: bool = False
    """Replace the FFN of the blocks in `layers` with product-key memory layers sharing one value table (Memory+)."""

    layers: list[int] = field(default_factory=list)
    """Blocks (0-based) whose FFN becomes a memory layer. Empty takes the flavor's placement: three layers, centred
    and spread out, as in the paper."""

    n_keys: int = bounded(-1, ge=2, allow=(-1,))
    """Sub-keys per half; the table has n_keys² value rows. -1 takes the flavor's default (1024 for the paper's
    models, i.e. 1M values)."""

    heads: int = bounded(4, ge=1)
    """Memory read heads; each selects knn rows and their reads are summed."""

    knn: int = bounded(32, ge=1)
    """Rows selected per head (the k of each top-k)."""

    k_dim: int = bounded(-1, ge=2, allow=(-1,))
    """Query/key width per head; each sub-key has k_dim / 2. Must be even. -1 means dim / 2."""

    v_dim: int = bounded(-1, ge=1, allow=(-1,))
    """Width of a value row. -1 means the model dim; another width adds a projection back to dim."""

    swilu: bool = True
    """Memory+ output W2(y ⊙ silu(W1 x)); false gives the plain memory output y."""

    qk_norm: bool = False
    """RMS-normalise the query halves and the sub-keys before scoring; helps big memories on small bases."""

    gated: bool = False
    """Multiply the memory output by a learned sigmoid gate of the input (an ablation of the paper)."""

    lookup: str = registered(LOOKUPS, "auto")
    """Implementation of the weighted bag of value rows: `torch` (F.embedding_bag) or the fused Triton kernels.
    `auto` is triton on CUDA and torch on CPU (where Triton only runs interpreted)."""

    key_search: str = registered(KEY_SEARCHES, "auto")
    """Implementation of the search for each token's best keys. `torch`: scores against every sub-key by one batched
    GEMM in the compute dtype, then torch.topk per half and over the k×k merge's candidates. `select`: the same with
    both top-k selections made by a Triton kernel, one warp per row (the fastest on an H200). `triton`: one fused
    kernel that scores in fp32 and never stores the scores, so its top-k is exact also under bf16, but slower.
    `auto` is select on CUDA and torch on CPU (docs/benchmarks.md)."""

    value_optimizer: str = registered(VALUE_OPTIMIZERS, "auto")
    """How the value table trains. `adamw`: dense gradient and dense AdamW, the paper's faithful baseline. `sgd`,
    `adagrad` (one fp32 state per row) and `adam` (lazy, row-sparse moments): fused row-wise updates of the touched
    rows only, with no dense gradient or dense state: Triton kernels on a GPU, tensor ops on a CPU (but a bf16 table
    rounded stochastically keeps the kernels, interpreted there, for their random bits). `auto` is adagrad on CUDA
    (the fastest whose loss matched AdamW's in our 134m check, docs/benchmarks.md) and adamw on CPU."""

    value_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage of the value table. `bf16` halves its memory (at 128B values, 34 GB instead of 69 GB per GPU on 8
    GPUs); it needs a row-wise value optimizer, whose fused update computes in fp32 and rounds back as
    `value_rounding` says."""

    value_rounding: Literal["stochastic", "nearest"] = "stochastic"
    """How a bf16 table's updated rows are rounded back to bf16. `stochastic` rounds up or down with the probability
    that makes the rounding unbiased, so updates smaller than a bf16 step still add up; its random bits are drawn by
    (training.seed, step, row, column) of the whole table, so a resume repeats them and every parallel layout draws
    the same. `nearest` drops every change under half a step (for
    comparison)."""

    value_state_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage of the lazy Adam moments of the value table (`value_optimizer = "adam"`)."""

    value_lr: float = bounded(-1.0, gt=0.0, allow=(-1.0,))
    """Peak learning rate of the value table; it follows the same schedule multiplier as the rest. -1 scales it with
    optimizer.lr: 10× for adamw and adam (the paper's 1e-3 over 1e-4), 50× for adagrad (matched to AdamW in our
    134m check). sgd needs an explicit value."""

    value_weight_decay: float = bounded(0.0, ge=0.0)
    """Weight decay of the value table."""

    value_max_norm: float = bounded(1.0, ge=0.0)
    """Clip the value table's gradient norm to this, separately from the other parameters; 0 disables clipping."""


@dataclass
class Training:
    steps: int = bounded(200, ge=1)
    """Optimizer steps to train for; the lr schedule is laid out over this many."""

    seq_len: int = bounded(256, ge=2)
    """Tokens per training sequence; documents are packed into sequences of this length."""

    local_batch_size: int = bounded(8, ge=1)
    """Sequences per micro-batch on each data-parallel rank."""

    global_batch_size: int = bounded(-1, ge=1, allow=(-1,))
    """Sequences per optimizer step over all ranks. -1 means local_batch_size × data-parallel degree; a larger multiple
    of that turns on gradient accumulation."""

    max_norm: float = bounded(1.0, ge=0.0)
    """Clip the total gradient norm to this value; 0 disables clipping (the norm is still logged)."""

    seed: int = bounded(0, ge=0)
    """Seed for model init and every random number generator."""

    deterministic: bool = False
    """Use deterministic kernels only (slower). With it, a resumed run reproduces the losses of an uninterrupted one."""

    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train. `auto` picks CUDA when a GPU is visible, else the CPU."""

    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision. `auto` is bf16 autocast on CUDA and fp32 on CPU; parameters always stay fp32."""

    gpu_memory_limit_gb: float = bounded(0.0, ge=0.0)
    """Cap each process's GPU memory at this many GB (10^9 bytes; `torch.cuda.set_per_process_memory_fraction`), e.g.
    80 to rehearse an H100 plan on a larger GPU: allocations past it fail as out-of-memory. 0: no cap."""

    on_nonfinite_loss: Literal["skip", "abort"] = "abort"
    """What to do when the loss or gradient norm is NaN/Inf: `skip` drops that step's update and counts it, `abort`
    stops with an error naming the step."""

    max_nonfinite_skips: int = bounded(10, ge=0)
    """With `skip`, abort anyway once more than this many steps have been skipped (counted across resumes)."""

    def check(self, config: "JobConfig") -> None:
        if self.global_batch_size != -1 and self.global_batch_size % self.local_batch_size:
            raise ConfigError(
                "training.global_batch_size",
                f"must be a multiple of training.local_batch_size ({self.local_batch_size}), "
                f"got {self.global_batch_size}",
            )


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    """Optimizer for the dense parameters."""

    lr: float = bounded(3e-4, gt=0.0)
    """Peak learning rate, reached at the end of warmup."""

    beta1: float = bounded(0.9, ge=0.0, lt=1.0)
    """Adam first-moment decay."""

    beta2: float = bounded(0.95, ge=0.0, lt=1.0)
    """Adam second-moment decay."""

    eps: float = bounded(1e-8, gt=0.0)
    """Adam denominator epsilon."""

    weight_decay: float = bounded(0.1, ge=0.0)
    """Decoupled weight decay of the matrices and embeddings."""

    decay_norms_and_biases: bool = False
    """Also apply weight decay to norm weights and biases (off, as is usual for LLMs)."""

    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """AdamW kernel: `auto` is fused on CUDA and foreach on CPU."""


@dataclass
class LRScheduler:
    warmup_steps: int = bounded(20, ge=0)
    """Steps of linear warmup from 0 to the peak lr."""

    decay_type: str = registered(LR_DECAYS, "linear")
    """Shape of the decay that follows warmup."""

    decay_steps: int = bounded(-1, ge=1, allow=(-1,))
    """Steps over which the lr decays to its floor; -1 means all steps left after warmup."""

    min_lr_factor: float = bounded(0.01, ge=0.0, le=1.0)
    """Floor of the decay as a fraction of the peak lr (0.01 decays to 1%)."""


@dataclass
class Checkpoint:
    enable: bool = True
    """Save checkpoints, and resume from the newest complete one at start."""

    folder: str = "checkpoint"
    """Folder under job.dump_folder that holds the `step-N` checkpoints: a relative name without '..', so that the
    run's lock on the dump folder covers it."""

    interval: int = bounded(100, ge=1)
    """Save every this many steps; the last step is always saved."""

    keep_latest_k: int = bounded(3, ge=0)
    """Keep only the newest k complete checkpoints; 0 keeps all."""

    load_step: int = bounded(-1, ge=0, allow=(-1,))
    """Resume from this step's checkpoint instead of the newest; -1 means the newest complete one. Training goes back
    to it once: the newer checkpoints are set aside (kept), and a relaunch of the same command (a requeue) goes on
    from the new timeline's newest checkpoint instead of going back again. eval, generate and export read exactly
    this step."""

    initial_load_path: str = ""
    """A checkpoint to start from when this run's own folder holds none: an exported folder (`python -m
    titanmem.export`: safetensors, weights only) or another run's `step-N` folder. eval and generate read it instead
    of the run's own checkpoints."""

    initial_load_model_only: bool = True
    """With a `step-N` folder as `initial_load_path`: load the model's weights only (a new run: fresh optimizer, lr
    schedule, data order and counters). false restores that checkpoint's whole training state, as a resume would."""

    verify_on_load: bool = True
    """Check every file of a checkpoint against its manifest (sizes and CRC-32 checksums, written by every save)
    before reading it: a resume that finds its newest checkpoint damaged says so and falls back to the one before, and
    a reader (eval, generate, export, `initial_load_path`) stops naming the damage. It reads the checkpoint once more,
    spread over the ranks (docs/benchmarks.md has its cost); false skips it, as for checkpoints saved before manifests
    existed."""

    io_threads: int = bounded(8, ge=1, le=64)
    """Threads per rank that write a checkpoint (each its own file, `__<rank>_<n>.distcp`) and that read one: a single
    stream gets a fraction of what a local NVMe disk or a cluster file system delivers to several (on an H100 host, 8
    threads loaded at 87% of the disk's rate, one at 64%). Any count reads a checkpoint written with any other
    (docs/benchmarks.md has the measured rates)."""

    sync_staging: Literal["pageable", "pinned"] = "pageable"
    """How a synchronous save (`async_mode = "disabled"`) takes the state off the GPU. `pageable`: DCP's writer threads
    copy each tensor as they write it, which holds the write below a fast disk (1.5 GB/s on an H100 host against the
    disk's 2.4). `pinned`: first into page-locked buffers kept from save to save (host memory the size of this rank's
    state; the first save allocates them), at tens of GB/s, and the threads then write at the disk's speed
    (docs/benchmarks.md). `async_with_pinned_mem` stages the same way and writes in the background."""

    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
    """`disabled`: training waits while a checkpoint is written. `async`: training waits only while the state is
    copied to CPU memory, and goes on while a background thread writes it and, as soon as every rank has written its
    part, makes it complete; the next save, and the end of training, wait for that only if it is still running.
    `async_with_pinned_mem`: as `async`, copying into pinned CPU buffers that are kept from save to save (faster
    GPU-to-CPU copies, at the cost of host memory the size of this rank's state; on CPU runs the same as `async`). A
    checkpoint becomes complete only once written: a crash during a background write leaves the previous one the
    newest complete checkpoint."""


@dataclass
class Finetune:
    mode: Literal["full", "values_only", "sparse_memory"] = "full"
    """What trains. `full`: every parameter (ordinary training). `values_only`: the memory value table alone; every
    other parameter is frozen and gets no gradient and no optimizer state. `sparse_memory`: only the `top_t` value
    rows of highest TF-IDF (their reads on the new data against `background_counts`), inside the fused row-wise
    value optimizer; the other rows, with their optimizer state, and every other parameter stay as they are. Start
    the run from the model to finetune with `checkpoint.initial_load_path`."""

    top_t: int = bounded(1000, ge=1)
    """With `sparse_memory`: the rows trained per step (`selection = "per_step"`), or in all (`per_dataset`)."""

    selection: Literal["per_step", "per_dataset"] = "per_step"
    """With `sparse_memory`: `per_step` ranks the rows each step reads by their reads in that step; `per_dataset`
    fixes the top_t rows once, by their reads over the whole finetuning set (`dataset_counts`), and each step trains
    those of them it reads."""

    background_counts: str = ""
    """With `sparse_memory`: the read counts of the model being finetuned over a sample of its pretraining data
    (`titanmem-count-reads` writes them): the inverse document frequency of each row."""

    dataset_counts: str = ""
    """With `selection = "per_dataset"`: the same model's read counts over the finetuning data, from the same tool."""


@dataclass
class Metrics:
    log_freq: int = bounded(10, ge=1)
    """Print a metrics line and write TensorBoard scalars every this many steps."""

    enable_tensorboard: bool = True
    """Write TensorBoard scalars."""

    save_tb_folder: str = "tb"
    """Folder under job.dump_folder for TensorBoard event files."""

    memory_telemetry_freq: int = bounded(100, ge=0)
    """Every this many steps, summarise how the memory layers used the value table since the last summary (rows hit,
    dead rows, usage entropy and KL to uniform, top-1 weight, hottest 1%; titanmem/eval/telemetry.py) into TensorBoard
    scalars and histograms, and a console line. Rows are counted on the device at every step. 0 disables."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch.profiler traces of `profiler_active` steps every `profile_freq` steps, one file per rank (open them
    in Perfetto, chrome://tracing or TensorBoard's profiler plugin). Off: nothing is recorded and nothing runs."""

    save_traces_folder: str = "profile_traces"
    """Folder under job.dump_folder for the traces: `iteration_<step>/rank<r>.pt.trace.json`."""

    profile_freq: int = bounded(100, ge=1)
    """Profile the `profiler_active` steps that end at every multiple of this step."""

    profiler_warmup: int = bounded(3, ge=0)
    """Steps traced but thrown away before the active ones (the first steps of a trace carry its start-up cost)."""

    profiler_active: int = bounded(1, ge=1)
    """Steps recorded in each trace."""

    enable_memory_snapshot: bool = False
    """Record the CUDA caching allocator's history and dump a snapshot every `profile_freq` steps, and on a CUDA
    out-of-memory error before the run stops (drag the file onto https://pytorch.org/memory_viz). CUDA only; on
    another device it is ignored with a warning."""

    save_memory_snapshot_folder: str = "memory_snapshot"
    """Folder under job.dump_folder for the snapshots: `iteration_<step>/rank<r>_memory_snapshot.pickle`, and
    `iteration_<step>_oom/` for the one taken on running out of memory."""

    def check(self, config: "JobConfig") -> None:
        if self.enable_profiling and self.profiler_warmup + self.profiler_active > self.profile_freq:
            raise ConfigError(
                "profiling.profile_freq",
                f"must be at least profiler_warmup + profiler_active = {self.profiler_warmup} + "
                f"{self.profiler_active}, got {self.profile_freq}; raise it or shorten the warm-up",
            )


@dataclass
class Parallelism:
    dp_replicate: int = bounded(1, ge=1)
    """Data-parallel replicas (the replicate dim of HSDP)."""

    dp_shard: int = bounded(-1, ge=1, allow=(-1,))
    """FSDP2 sharding degree; -1 takes the ranks left after the other degrees."""

    tp: int = bounded(1, ge=1)
    """Tensor-parallel degree."""

    mp: int = bounded(1, ge=1)
    """Memory-parallel degree, carved out of the data-parallel ranks: each group of mp consecutive data-parallel ranks
    splits the value table's columns (v_dim / mp each) and looks up for the whole group's tokens."""

    value_slice_sharding: Literal["auto", "replicate", "fsdp", "rows"] = "auto"
    """How the ranks that hold the same value-table slice (the mp groups, side by side; with mp = 1, every
    data-parallel rank) keep it. `rows`: each holds one block of the slice's rows (rows / R × v_dim / mp per GPU over
    R replicas) and updates only those; every lookup sends each read to the rows' owners and sums their partial
    read-outs back, so the table is stored once over the whole cluster and the update's work per GPU does not grow
    with R. `replicate`: each holds the whole slice; a row-wise value optimizer gathers the step's reads over them
    (rows, weights and read-out gradients) and every one applies the same sparse update of all of them; dense AdamW
    all-reduces the dense gradient. `fsdp`: FSDP2 shards it by rows, gathered whole for the step, with a dense
    gradient reduce-scatter (dense AdamW only). `auto`: whichever of rows and replicate the planner's step-time model
    finds cheaper with a row-wise value optimizer (docs/planner.md), fsdp with adamw."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward instead of keeping them: `full` for every block, `selective` for every
    `selective_layer_stride`-th block, `none` keeps all (fastest, most memory)."""

    selective_layer_stride: int = bounded(2, ge=1)
    """With `selective`, checkpoint blocks 0, stride, 2·stride, ...: 2 halves the saved activations."""


@dataclass
class Compile:
    enable: bool = False
    """Compile each transformer block with torch.compile (applied before FSDP, after tensor and memory parallel)."""

    backend: str = "inductor"
    """torch.compile backend; `inductor` generates fused kernels, `aot_eager` only traces (for debugging)."""


@dataclass
class Eval:
    interval: int = bounded(0, ge=0)
    """Evaluate every this many training steps, and after the last one; 0 evaluates only in `python -m
    titanmem.eval`. Every rank takes part (sharded models need all of them); rank 0 writes the results."""

    perplexity_path: str = "assets/corpus/validation.jsonl.gz"
    """Held-out text for perplexity (a local file, read like `data.path`)."""

    perplexity_tokens: int = bounded(65536, ge=1)
    """Tokens of held-out text to score, in windows of training.seq_len from the start of the file."""

    facts_limit: int = bounded(2000, ge=0)
    """Facts of `data.facts_path` to ask about: a fixed sample of this many, the same at every eval, half seen and half
    unseen, each half spread evenly over the relations (a relation with fewer facts gives all of them); 0 asks about
    all. Each fact is asked in its training phrasing, its Q/A phrasing and the held-out ones."""

    max_new_tokens: int = bounded(12, ge=1)
    """Greedy tokens generated per fact prompt before scoring."""

    kv_cache: bool = True
    """Decode the fact prompts with a KV cache, prompts of all lengths batched together (left-padded). False re-runs
    the whole prefix for every token, batching prompts of equal length only: the same greedy answers up to rounding
    (bf16 can break a near-tie the other way), slower."""

    batch_size: int = bounded(64, ge=1)
    """Sequences per eval forward."""

    dump_memory: bool = False
    """Also save the memory layers' selected rows and scores on the perplexity text, per layer, to
    `memory-step-<N>.pt` in the results folder (see `results_folder`), for offline analysis."""

    results_folder: str = ""
    """Where `python -m titanmem.eval` appends results.jsonl (and memory dumps); empty prints the results only. It must
    lie outside `job.dump_folder`: reading a run never writes into it. In training, results go to
    `<job.dump_folder>/eval`."""

    def check(self, config: "JobConfig") -> None:
        if not self.kv_cache and config.parallelism.tp > 1:
            raise ConfigError("eval.kv_cache", "must be true with parallelism.tp > 1: sequence parallel splits each "
                              "forward's tokens over the tp ranks, and only the cached decoder pads them to fit")


@dataclass
class Generate:
    prompts: list[str] = field(default_factory=list)
    """Prompts for `python -m titanmem.generate`, e.g. --generate.prompts '["The capital of France is"]'."""

    checkpoint: str = ""
    """A `step-N` checkpoint folder to load; empty takes `checkpoint.load_step`'s, or else the newest complete one, in
    `<job.dump_folder>/<checkpoint.folder>`."""

    max_new_tokens: int = bounded(32, ge=1)
    """Tokens to generate per prompt (fewer if the end-of-text token comes first)."""

    temperature: float = bounded(0.0, ge=0.0)
    """0 decodes greedily; above 0, samples from the softmax of logits / temperature."""

    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    """When sampling: keep the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""

    seed: int = 0
    """Seed of the sampler: the same seed, prompts and checkpoint give the same text."""


@dataclass
class Export:
    folder: str = ""
    """Where `python -m titanmem.export` writes the model: safetensors files, their index, `config.json` and the
    tokenizer. It must be empty or new, and lie outside `job.dump_folder` (reading a run never writes into it)."""

    max_shard_gb: float = bounded(5.0, gt=0.0)
    """Largest safetensors file, in GB (10⁹ bytes); a single tensor larger than this gets a file of its own."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the exported weights (training keeps fp32 parameters)."""

    format: str = registered(EXPORT_FORMATS, "titanmem")
    """`titanmem`: titanmem's own names and `config.json`, which `checkpoint.initial_load_path`, eval and generate
    read. `hf`: a Hugging Face transformers folder (`AutoModelForCausalLM.from_pretrained`), with the tokenizer as
    `tokenizer.json`: a dense model is a plain `LlamaForCausalLM`; a memory model is Llama with the memory layers in
    their blocks' FFN slots, its code written into the folder (load it with `trust_remote_code=True`)."""


@dataclass
class Comm:
    init_timeout_seconds: int = bounded(600, ge=1)
    """Seconds the ranks wait for each other while the run starts (forming the process group, building the model,
    loading a checkpoint), in the first step of a launch (compilation, first allocations), in an evaluation or a
    checkpoint save, and in the step after either. A rank that has not arrived by then ends the run: every rank that
    waited exits with one line naming it (docs/architecture.md, "When a rank stops"). The process groups' own
    timeouts are this plus 50 s, a backstop."""

    train_timeout_seconds: int = bounded(300, ge=1)
    """Seconds one training step (after the first of the launch) may take on any rank before the run ends as hung, as
    above. Keep it well above the step time: a step that takes more than half of it gets a warning."""

    trace_buf_size: int = bounded(20000, ge=0)
    """CUDA: collectives the NCCL flight recorder keeps per rank; on a timeout each rank writes them to
    `<job.dump_folder>/comm_traces/rank_<r>` (read them with `python -m torch.distributed.flight_recorder.fr_trace
    <folder>`, which names the collective a rank never joined). 0 turns the recorder off."""

    def check(self, config: "JobConfig") -> None:
        if self.train_timeout_seconds > self.init_timeout_seconds:
            raise ConfigError(
                "comm.train_timeout_seconds",
                f"must not exceed comm.init_timeout_seconds ({self.init_timeout_seconds}), got "
                f"{self.train_timeout_seconds}: the first step, saves and evaluations get the longer init timeout",
            )


@dataclass
class JobConfig:
    """The whole run's configuration: one attribute per TOML section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    memory: Memory = field(default_factory=Memory)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    finetune: Finetune = field(default_factory=Finetune)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    eval: Eval = field(default_factory=Eval)
    generate: Generate = field(default_factory=Generate)
    export: Export = field(default_factory=Export)
    comm: Comm = field(default_factory=Comm)
