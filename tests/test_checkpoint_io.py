"""Checkpoint I/O: several writer and reader threads per rank, and async saves that become complete as soon as they
are written."""

import random
import time

import pytest
import torch

from titanmem.components.checkpoint import CheckpointManager, checkpoint_problems, complete_checkpoint_steps
from titanmem.components.checkpoint_io import groups_by_bytes, load_tensors
from titanmem.components.manifest import files_of_rank
from titanmem.config.sections import Checkpoint


class Holder:
    """A Stateful of plain tensors."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, state: dict) -> None:
        for name, tensor in state.items():
            self.tensors[name].copy_(tensor)


def random_state(seed: int) -> dict:
    """Tensors of several dtypes and sizes, a 0-d one and an empty one among them."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(300, 170, generator=generator),
        "half": torch.randn(77, 13, generator=generator).to(torch.bfloat16),
        "ints": torch.randint(-5, 5, (1001,), generator=generator),
        "flags": torch.rand(33, generator=generator) < 0.5,
        "scalar": torch.tensor(float(seed)),
        "empty": torch.zeros(0, 4),
        **{f"small.{i}": torch.randn(i + 1, generator=generator) for i in range(9)},
    }


def zeros_like(state: dict) -> dict:
    return {name: torch.zeros_like(tensor) for name, tensor in state.items()}


@pytest.mark.parametrize("write_threads", [1, 3])
def test_every_reader_thread_count_reads_what_every_writer_thread_count_wrote(tmp_path, write_threads):
    state = random_state(write_threads)
    manager = CheckpointManager(Checkpoint(io_threads=write_threads), tmp_path, {"state": Holder(state)},
                                total_steps=1)
    manager.save(1)
    folder = tmp_path / "step-1"
    assert len(files_of_rank(folder, 0)) == write_threads  # one file per writer thread
    assert checkpoint_problems(folder) == []  # the manifest covers every file
    for read_threads in (1, 2, 5):
        loaded = {"state": zeros_like(state)}
        load_tensors(loaded, folder, threads=read_threads)
        for name, tensor in state.items():
            assert torch.equal(loaded["state"][name], tensor), (read_threads, name)


def test_the_reader_threads_share_the_items_out_by_bytes():
    rng = random.Random(0)
    for _ in range(50):
        sizes = [rng.choice((0, 1, rng.randint(1, 1000), rng.randint(1, 10**6))) for _ in range(rng.randint(0, 40))]
        count = rng.randint(1, 9)
        groups = groups_by_bytes(list(range(len(sizes))), lambda i: sizes[i], count)
        assert sorted(i for group in groups for i in group) == list(range(len(sizes)))  # each item exactly once
        assert all(group == sorted(group) and group for group in groups)  # in order, none empty
        assert len(groups) <= count
        if len(groups) > 1:
            # Largest first to the lightest: no group exceeds the mean by more than the largest item.
            loads = [sum(sizes[i] for i in group) for group in groups]
            assert max(loads) <= sum(sizes) / len(groups) + max(sizes)


def test_an_async_save_is_complete_as_soon_as_it_is_written(tmp_path):
    """No later save and no end of training is needed: the background thread writes, sums and renames."""
    state = random_state(7)
    manager = CheckpointManager(Checkpoint(async_mode="async", io_threads=2), tmp_path, {"state": Holder(state)},
                                total_steps=10)
    try:
        manager.save(2)
        deadline = time.monotonic() + 120
        while not complete_checkpoint_steps(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert complete_checkpoint_steps(tmp_path) == [2]
        assert manager._pending is not None, "the save was waited for, not completed by its own thread"
        assert checkpoint_problems(tmp_path / "step-2") == []
        assert not (tmp_path / "step-2.partial").exists()
        loaded = {"state": zeros_like(state)}
        load_tensors(loaded, tmp_path / "step-2", threads=3)
        assert all(torch.equal(loaded["state"][name], tensor) for name, tensor in state.items())
    finally:
        manager.close()
    assert manager._pending is None


def test_a_failed_background_save_stops_the_next_save_and_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    """A write that fails in the background (a full disk, say) is not made complete; the next save or the end
    raises it rather than going on with a checkpoint missing."""
    import titanmem.components.checkpoint as checkpoint

    def failing_digests(folder, names):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.CheckpointManager, "_own_digests",
                        lambda self, partial, writer: failing_digests(partial, []))
    manager = CheckpointManager(Checkpoint(async_mode="async"), tmp_path, {"state": Holder(random_state(3))},
                                total_steps=10)
    try:
        manager.save(2)
        with pytest.raises(checkpoint.CheckpointWriteError, match="step-2 could not be written to .*No space left on "
                           "device .*no complete checkpoint yet"):
            manager.wait()
    finally:
        manager.close()
    assert complete_checkpoint_steps(tmp_path) == [] and not (tmp_path / "step-2.partial").exists()


def test_a_run_saved_with_several_writer_threads_resumes_with_one(tmp_path):
    from titanmem.train import main

    common = ["--job.dump_folder", str(tmp_path), "--memory.enabled", "--training.device", "cpu", "--training.seq_len",
              "32", "--training.local_batch_size", "2", "--checkpoint.interval", "2", "--metrics.enable_tensorboard",
              "false", "--training.deterministic"]
    assert main([*common, "--training.steps", "2", "--checkpoint.io_threads", "3"]) == 0
    assert len(files_of_rank(tmp_path / "checkpoint" / "step-2", 0)) == 3
    assert main([*common, "--training.steps", "3", "--checkpoint.io_threads", "1"]) == 0
    assert complete_checkpoint_steps(tmp_path / "checkpoint") == [2, 3]
    assert len(files_of_rank(tmp_path / "checkpoint" / "step-3", 0)) == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_the_files_are_summed_as_they_are_written_exactly_as_by_reading_them(tmp_path, threads, monkeypatch):
    """The writer's digests of every data file equal `file_digests` of the file on disk (chunk boundaries crossed
    by the writes included), and the save uses them: it reads none of its data files back."""
    import titanmem.components.checkpoint as checkpoint
    from titanmem.components import manifest, summing_writer

    monkeypatch.setattr(manifest, "CHUNK_BYTES", 4096)  # many chunks, and writes that straddle them
    monkeypatch.setattr(summing_writer, "CHUNK_BYTES", 4096)
    read_back = []
    reading = checkpoint.file_digests
    monkeypatch.setattr(checkpoint, "file_digests", lambda folder, names: read_back.extend(names) or reading(folder,
                                                                                                          names))
    state = random_state(11)
    manager = CheckpointManager(Checkpoint(io_threads=threads), tmp_path, {"state": Holder(state)}, total_steps=1)
    writer = manager._writer(tmp_path / "probe")
    manager._writer = lambda partial: writer.reset(str(partial)) or writer  # keep the writer to look at its digests
    manager.save(1)
    folder = tmp_path / "step-1"
    names = files_of_rank(folder, 0)
    assert len(names) == threads and sorted(writer.digests) == names
    assert writer.digests == manifest.file_digests(folder, names)
    assert all(len(digest["crc32"]) > 1 for digest in writer.digests.values())
    assert not any(name.endswith(".distcp") for name in read_back)  # only the index was read to sum it
    assert checkpoint_problems(folder) == []


def test_a_stream_that_is_moved_has_no_digest_and_its_file_is_read_instead(tmp_path):
    import io

    from titanmem.components.summing_writer import SummingStream

    for move in (lambda s: s.seek(3), lambda s: s.truncate(5)):
        stream = SummingStream(io.BytesIO())
        stream.write(b"0123456789")
        move(stream)
        assert stream.digest() is None
    stream = SummingStream(io.BytesIO())
    stream.write(b"abc")
    stream.seek(0, 2)  # to its end: still appending
    stream.writelines([b"de", bytearray(b"f")])
    assert stream.digest() == {"size": 6, "crc32": [f"{zlib_crc(b'abcdef'):08x}"]}
    assert SummingStream(io.BytesIO()).digest() == {"size": 0, "crc32": ["00000000"]}


def zlib_crc(data: bytes) -> int:
    import zlib

    return zlib.crc32(data)


@pytest.mark.parametrize("staging", ["pageable", "pinned"])
def test_a_sync_save_staged_either_way_saves_the_state_as_it_was(tmp_path, staging):
    """Staged through buffers kept from save to save (`sync_staging = "pinned"`), each save holds the state of its own
    step, not the buffers' earlier contents."""
    state = random_state(5)
    manager = CheckpointManager(Checkpoint(sync_staging=staging, io_threads=2), tmp_path, {"state": Holder(state)},
                                total_steps=4)
    try:
        expected = {}
        for step in (2, 4):
            for tensor in state.values():
                if tensor.is_floating_point():
                    tensor.add_(step)
            expected[step] = {name: tensor.clone() for name, tensor in state.items()}
            manager.save(step)
    finally:
        manager.close()
    assert manager._stager is None  # released at close
    for step in (2, 4):
        loaded = {"state": zeros_like(state)}
        load_tensors(loaded, tmp_path / f"step-{step}", threads=2)
        for name, tensor in expected[step].items():
            assert torch.equal(loaded["state"][name], tensor), (step, name)

