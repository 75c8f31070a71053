# Environment defaults for multi-GPU and multi-node training, sourced by launch/run_multinode.sh. Each is set only
# when unset, so a cluster's own settings (exported before the launch) win. Add your fabric's own here or in the job
# script, e.g. NCCL_SOCKET_IFNAME=<interface> and NCCL_IB_HCA=<devices> on InfiniBand clusters.

# A failed or timed-out collective aborts NCCL and ends the process, so the job dies and can be requeued instead of
# hanging.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"; export TORCH_NCCL_ASYNC_ERROR_HANDLING
# On a collective timeout, each rank dumps its recent collectives: which rank was behind, and where.
: "${TORCH_NCCL_DUMP_ON_TIMEOUT:=1}"; export TORCH_NCCL_DUMP_ON_TIMEOUT
# NCCL prints warnings and errors (which interface, which transport failed), not its per-call chatter.
: "${NCCL_DEBUG:=WARN}"; export NCCL_DEBUG
# FSDP2 frees communication buffers by stream order, not by the allocator's record_stream: less peak memory.
: "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"; export TORCH_NCCL_AVOID_RECORD_STREAMS
# Activations of varying size fragment the caching allocator; expandable segments reuse freed memory.
: "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"; export PYTORCH_CUDA_ALLOC_CONF
# One OpenMP thread per rank: eight ranks on a node would otherwise oversubscribe its cores (torchrun's default too,
# set here so it does not warn).
: "${OMP_NUM_THREADS:=1}"; export OMP_NUM_THREADS
# Loader workers and eval tokenize in parallel; the fast tokenizers' own threads would contend with them.
: "${TOKENIZERS_PARALLELISM:=false}"; export TOKENIZERS_PARALLELISM
# Logs reach the console and the job's log file as they are written, not when a buffer fills.
: "${PYTHONUNBUFFERED:=1}"; export PYTHONUNBUFFERED
