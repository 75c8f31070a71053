"""The streamed export: the safetensors stream writer gives save_file's bytes, a checkpoint's tensors read by rows
from any layout of stored blocks equal the whole tensors, an export gives the bytes of the former load-then-write
export, its host memory stays bounded whatever the table's size, and damaged or hostile folders stop with one line."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import launch_ranks, reader_argv, run_as_rank, train_tiny_run
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


# --- the safetensors stream writer -------------------------------------------------------------------------------

def random_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors of several dtypes and odd shapes: 0-size, 1-D, 0-D, 3-D."""

    def size(low, high):
        return int(torch.randint(low, high, (), generator=generator))

    return {
        "w.fp32": torch.randn(size(1, 40), size(1, 9), generator=generator),
        "a.bf16": torch.randn(size(1, 30), generator=generator).bfloat16(),
        "ids": torch.randint(-(2**40), 2**40, (size(1, 5), 3, size(1, 7)), generator=generator),
        "empty": torch.zeros(0, size(1, 5)),
        "scalar": torch.randn((), generator=generator),
        "z.bf16": torch.randn(size(2, 9), size(2, 9), generator=generator).bfloat16(),
        "h": torch.randn(size(1, 5), generator=generator).half(),
    }


def streamed(tensors: dict[str, torch.Tensor], rows: int):
    from titanmem.components.safetensors_stream import StreamedTensor

    def blocks(tensor):
        if tensor.ndim == 0:
            return lambda: iter([tensor])
        return lambda: (tensor[start : start + rows] for start in range(0, tensor.shape[0], rows))

    return {name: StreamedTensor(t.dtype, tuple(t.shape), blocks(t)) for name, t in tensors.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_stream_writer_writes_the_bytes_of_save_file(tmp_path, seed):
    from titanmem.components.safetensors_stream import write_safetensors

    generator = torch.Generator().manual_seed(seed)
    tensors = random_tensors(generator)
    chosen = {name: tensors[name] for name in tensors if torch.rand((), generator=generator) < 0.8} or tensors
    for case, subset in {"all": tensors, "some": chosen, "one": {"w.fp32": tensors["w.fp32"]}, "none": {}}.items():
        save_file(subset, tmp_path / f"{case}.reference", metadata={"format": "pt"})
        for rows in (1, 3, 1000):
            size = write_safetensors(tmp_path / f"{case}.{rows}", streamed(subset, rows), metadata={"format": "pt"})
            expected = (tmp_path / f"{case}.reference").read_bytes()
            assert (tmp_path / f"{case}.{rows}").read_bytes() == expected, (case, rows)
            assert size == len(expected)


def test_blocks_that_do_not_add_up_to_the_shape_are_refused(tmp_path):
    from titanmem.components.safetensors_stream import StreamedTensor, write_safetensors

    short = StreamedTensor(torch.float32, (4, 2), lambda: iter([torch.zeros(3, 2)]))
    with pytest.raises(ValueError, match="blocks hold 24 bytes"):
        write_safetensors(tmp_path / "x", {"x": short})


# --- reading a checkpoint's stored blocks ------------------------------------------------------------------------

# name -> (shape, placements over a 2 × 2 mesh): rows, rows and columns (the value table's grid), columns, blocks
# that leave a rank nothing, replicated.
LAYOUTS = {
    "rows": ((11, 5), ("S0", "R")),
    "rows4": ((13, 3), ("S0", "S0")),
    "grid": ((9, 7), ("S0", "S1")),
    "grid_t": ((10, 5), ("S1", "S0")),
    "columns": ((6, 9), ("R", "S1")),
    "few_rows": ((3, 4), ("S0", "S0")),
    "vector": ((13,), ("S0", "S0")),
    "cube": ((7, 3, 5), ("S0", "S2")),
    "replicated": ((5, 2), ("R", "R")),
}


def layout_tensors() -> dict[str, torch.Tensor]:
    """The full tensors that every rank shards (the same on every rank: drawn from a fixed seed)."""
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name, (shape, _) in LAYOUTS.items():
        for dtype in (torch.float32, torch.bfloat16):
            tensors[f"{name}.{str(dtype).removeprefix('torch.')}"] = torch.randn(shape, generator=generator).to(dtype)
    return tensors


def sharded_save_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One of 4 ranks: save every tensor of `layout_tensors` as a DTensor over a 2 × 2 mesh, with an optimizer entry
    beside the model's, in two files per rank."""

    def body():
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (2, 2))
        model = {}
        for name, tensor in layout_tensors().items():
            placements = [Replicate() if p == "R" else Shard(int(p[1])) for p in LAYOUTS[name.split(".")[0]][1]]
            model[name] = distribute_tensor(tensor, mesh, placements)
        optimizer = {"state.rows.exp_avg": distribute_tensor(torch.ones(11, 5), mesh, [Shard(0), Replicate()])}
        # Two files per rank; and the serial loader, which never touches CUDA (this rank is a forked process).
        dcp.save({"model": model, "optimizer": optimizer},
                 storage_writer=dcp.FileSystemWriter(folder, thread_count=2))

    run_as_rank(rank, world, port, body)


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "step-1"
    launch_ranks(sharded_save_worker, 4, str(folder))
    return folder


def test_rows_read_from_blocks_of_any_layout_equal_the_whole_tensor(sharded_checkpoint):
    from titanmem.components.checkpoint_io import read_metadata
    from titanmem.components.stored_tensors import open_stored_tensors

    expected = layout_tensors()
    chunks = {key: len(entry.chunks) for key, entry in read_metadata(sharded_checkpoint).state_dict_metadata.items()}
    assert chunks["model.grid.float32"] == 4 and chunks["model.rows.bfloat16"] == 2  # several blocks, as meant
    source = open_stored_tensors(sharded_checkpoint)
    assert source.names() == sorted(expected)  # the optimizer's entry is not a model tensor
    generator = torch.Generator().manual_seed(3)
    for name, tensor in expected.items():
        assert source.shape(name) == tensor.shape and source.dtype(name) == tensor.dtype, name
        assert torch.equal(source.read(name), tensor), name
        rows = tensor.shape[0]
        for _ in range(12):
            start = int(torch.randint(0, rows + 1, (), generator=generator))
            stop = int(torch.randint(start, rows + 1, (), generator=generator))
            assert torch.equal(source.read(name, start, stop), tensor[start:stop]), (name, start, stop)


def test_rows_of_tensors_stored_in_any_memory_layout(tmp_path):
    """A tensor is stored with the strides it had: a transposed one has its rows interleaved in the storage."""
    from titanmem.components.stored_tensors import open_stored_tensors

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "transposed": torch.randn(300, 70, generator=generator).t(),
        "permuted": torch.randn(9, 4, 5, generator=generator).permute(2, 0, 1),
        "scalar": torch.randn((), generator=generator),
        "empty": torch.zeros(0, 3),
    }
    dcp.save({"model": tensors}, checkpoint_id=str(tmp_path / "step-1"))
    source = open_stored_tensors(tmp_path / "step-1")
    for name, tensor in tensors.items():
        assert torch.equal(source.read(name), tensor), name
        for start, stop in ((0, 1), (2, 5), (1, 1)) if tensor.ndim and len(tensor) >= 5 else ():
            assert torch.equal(source.read(name, start, stop), tensor[start:stop]), (name, start, stop)


def test_rows_of_a_view_saved_with_its_whole_storage(tmp_path):
    """torch.save keeps a view's whole storage and its offset into it; DCP copies views first, but a writer that
    did not (an older torch's, another loader's) leaves such a record, read all the same."""
    import io

    from titanmem.components.stored_tensors import open_stored_tensors

    whole = torch.randn(40, 33, generator=torch.Generator().manual_seed(1))
    for name, view in {"rows": whole[3:20], "columns": whole[5:30, 4:11]}.items():
        checkpoint = tmp_path / name
        dcp.save({"model": {"v": torch.zeros(view.shape)}}, checkpoint_id=str(checkpoint))
        record = io.BytesIO()
        torch.save(view, record)
        point_chunk_at(checkpoint, "model.v", record.getvalue())
        source = open_stored_tensors(checkpoint)
        assert torch.equal(source.read("v"), view) and torch.equal(source.read("v", 2, 9), view[2:9]), name


# --- the export against the former one ---------------------------------------------------------------------------

def former_write_export(model, folder, *, model_args, step, max_shard_bytes, dtype, tokenizer_files):
    """The export as it was before streaming: the whole model converted in memory, then `save_file` per shard."""
    import dataclasses

    from titanmem.distributed.initialize import model_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {model_name(name): param.detach().to("cpu", dtype).contiguous()
               for name, param in model.named_parameters()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        path = folder / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    config = {"model": dataclasses.asdict(model_args), "dtype": str(dtype).removeprefix("torch."), "step": step}
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    (folder / "tokenizer").mkdir(exist_ok=True)
    for path in tokenizer_files:
        shutil.copyfile(path, folder / "tokenizer" / path.name)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (dtype, max_shard_gb): the memory table (4 MB in fp32) is larger than the smallest shards.
EXPORTS = {"fp32": ("fp32", "0.01"), "bf16": ("bf16", "0.01"), "fp32-small-shards": ("fp32", "0.003"),
           "bf16-one-file": ("bf16", "5")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from titanmem.build import build_run
    from titanmem.components.checkpoint import saved_step
    from titanmem.config import build_config, resolve_asset_path
    from titanmem.plan import resolve_plan

    root = tmp_path_factory.mktemp("streamed")
    train_tiny_run(root / "run", checkpoint={"enable": True, "interval": 3})
    config, _ = build_config(reader_argv(root / "run", "--export.folder", str(root / "unused")))
    plan = resolve_plan(config, "export")
    model = build_run(plan).model  # the former export's way: the checkpoint loaded into a whole model
    tokenizer = resolve_asset_path(config.tokenizer.path)
    for case, (dtype, shard_gb) in EXPORTS.items():
        former_write_export(model, root / f"former-{case}", model_args=plan.model_args,
                            step=saved_step(plan.checkpoint_to_load), max_shard_bytes=int(float(shard_gb) * 1e9),
                            dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                            tokenizer_files=[p for p in (tokenizer, tokenizer.with_suffix(".json")) if p.is_file()])
    return root


@pytest.mark.parametrize("case", list(EXPORTS))
def test_the_streamed_export_writes_the_bytes_of_the_former_one(trained, case):
    from titanmem.export import main

    dtype, shard_gb = EXPORTS[case]
    out = trained / f"streamed-{case}"
    assert main(reader_argv(trained / "run", "--export.folder", str(out), "--export.dtype", dtype,
                            "--export.max_shard_gb", shard_gb)) == 0
    former = files_of(trained / f"former-{case}")
    assert len([name for name in former if name.endswith(".safetensors")]) > (1 if shard_gb != "5" else 0)
    assert files_of(out) == former


def test_an_export_exports_again_to_the_same_bytes(trained):
    """An exported folder is a source too: its fp32 export, exported as bf16, is the checkpoint's bf16 export."""
    from titanmem.export import main

    if not (trained / "streamed-fp32").is_dir():
        assert main(reader_argv(trained / "run", "--export.folder", str(trained / "streamed-fp32"),
                                "--export.max_shard_gb", "0.01")) == 0
    out = trained / "re-exported"
    assert main(reader_argv(trained / "run", "--checkpoint.initial_load_path", str(trained / "streamed-fp32"),
                            "--export.folder", str(out), "--export.dtype", "bf16", "--export.max_shard_gb",
                            "0.01")) == 0
    assert files_of(out) == files_of(trained / "former-bf16")


# --- bounded memory ----------------------------------------------------------------------------------------------

def write_synthetic_run(folder: Path, argv: list[str], drop: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint `step-1` of the model of `argv`, written with DCP directly (no training): random weights; the
    tensor `drop` left out. Returns the small tensors (the memory table is `table_value(rows, columns)`)."""
    from titanmem.build import build_model
    from titanmem.config import build_config
    from titanmem.plan import resolve_plan

    config, _ = build_config(argv)
    model = build_model(resolve_plan(config, "dry_run").model_args, "meta")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, param in model.named_parameters():
        if name == "memory_values.weight":
            state[name] = table_value(*param.shape)
        elif name != drop:
            state[name] = torch.randn(param.shape, generator=generator)
    dcp.save({"model": state}, checkpoint_id=str(folder / "checkpoint" / "step-1"))
    return {name: tensor for name, tensor in state.items() if name != "memory_values.weight"}


def table_value(rows: int, columns: int, start: int = 0) -> torch.Tensor:
    """Rows [start, rows) of a table cheap to make and to check: row r holds r + column / 1024 (computed element by
    element, so any block of rows is made the same as the whole)."""
    return torch.arange(start, rows, dtype=torch.float32)[:, None] + torch.arange(columns, dtype=torch.float32) / 1024


# The child exports, and reports its resident memory before (once everything the export imports and builds that
# does not grow with the model is there: its modules, the plan, the meta model) and at its peak.
MEASURE = """
import json, sys
import titanmem.export
from titanmem.build import build_model
from titanmem.config import build_config
from titanmem.plan import resolve_plan

def status(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":"))) * 1024

argv = json.loads(sys.argv[1])
build_model(resolve_plan(build_config(argv)[0], "export").model_args, "meta")
before = status("VmRSS")
code = titanmem.export.main(argv)
print(json.dumps({"code": code, "before": before, "peak": status("VmHWM")}))
"""
# 700² rows × 256 columns of fp32: a 500 MB table.
BIG_KEYS = 700
MEMORY_CAP = 200e6


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident memory from /proc")
def test_exporting_a_table_larger_than_the_memory_cap_stays_under_it(tmp_path):
    from safetensors import safe_open

    def argv(dtype: str) -> list[str]:
        return reader_argv(tmp_path / "run", "--memory.n_keys", str(BIG_KEYS), "--export.folder",
                           str(tmp_path / f"out-{dtype}"), "--export.dtype", dtype)

    write_synthetic_run(tmp_path / "run", argv("fp32"))
    rows = BIG_KEYS**2
    assert rows * 256 * 4 > 2.5 * MEMORY_CAP
    for dtype in ("fp32", "bf16"):
        result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(argv(dtype))], check=False,
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["code"] == 0, result.stderr[-2000:]
        grown = report["peak"] - report["before"]
        assert grown < MEMORY_CAP, f"{dtype}: peak resident memory grew by {grown / 1e6:.0f} MB"
        assert "peak host memory (RSS)" in result.stderr
        out = tmp_path / f"out-{dtype}"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        with safe_open(str(out / index["weight_map"]["memory_values.weight"]), framework="pt") as handle:
            table = handle.get_slice("memory_values.weight")
            for start in (0, rows // 2 + 1, rows - 3):
                got = table[start : start + 3]
                assert torch.equal(got, table_value(start + 3, 256, start).to(got.dtype)), (dtype, start)


# --- damaged and hostile folders ---------------------------------------------------------------------------------

@pytest.fixture
def small_run(tmp_path):
    argv = reader_argv(tmp_path / "run", "--export.folder", str(tmp_path / "out"))
    write_synthetic_run(tmp_path / "run", argv)
    return tmp_path / "run" / "checkpoint" / "step-1", argv


def export_error(argv, capsys) -> str:
    from titanmem.export import main

    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # a warning may come first: a checkpoint with no manifest
    assert lines[-1].startswith("error: config error in ") and not any(line.startswith(" ") for line in lines), lines
    return lines[-1]


def test_a_truncated_chunk_file_is_one_line_naming_it(small_run, capsys):
    checkpoint, argv = small_run
    data = next(checkpoint.glob("*.distcp"))
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size // 2)
    error = export_error(argv, capsys)
    assert str(data) in error and "checkpoint.folder" in error


def test_an_index_pointing_past_the_end_of_a_file_is_one_line(small_run, capsys):
    from titanmem.components.stored_tensors import open_stored_tensors
    from titanmem.config import ConfigError

    checkpoint, argv = small_run
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # our own file: plain pickle is fine here
    for index, info in metadata.storage_data.items():
        if index.fqn == "model.norm.weight":
            info.offset = (checkpoint / info.relative_path).stat().st_size + 64
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    error = export_error(argv, capsys)
    assert "bytes long, but the index places a record up to byte" in error
    with pytest.raises(ConfigError, match=r"\.distcp cannot be read"):
        open_stored_tensors(checkpoint).read("norm.weight")


def test_a_missing_or_reshaped_tensor_is_one_line_naming_the_first(tmp_path, capsys):
    argv = reader_argv(tmp_path / "run", "--export.folder", str(tmp_path / "out"))
    write_synthetic_run(tmp_path / "run", argv, drop="norm.weight")
    error = export_error(argv, capsys)
    assert "lacks 1 tensors this model has (first: norm.weight)" in error
    error = export_error([*argv, "--memory.n_keys", "32"], capsys)
    assert "holds memory_values.weight of shape [4096, 256], but this model's is [1024, 256]" in error
    assert not (tmp_path / "out").exists()


class _Planted:
    """Unpickling this writes a file: the proof that a checkpoint ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def point_chunk_at(checkpoint: Path, fqn: str, data: bytes) -> None:
    """Store `data` as the record of `fqn`'s block: a new file of the folder, the index pointing at it."""
    (checkpoint / "planted.distcp").write_bytes(data)
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == fqn:
            info.relative_path, info.offset, info.length = "planted.distcp", 0, len(data)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_planted_or_compressed_record_is_refused_without_running_code(small_run, tmp_path):
    import io

    from titanmem.components.stored_tensors import open_stored_tensors
    from titanmem.config import ConfigError

    checkpoint, _ = small_run
    marker = tmp_path / "marker"
    planted = io.BytesIO()
    torch.save(_Planted(marker), planted)
    point_chunk_at(checkpoint, "model.norm.weight", planted.getvalue())
    with pytest.raises(ConfigError, match="exec, which a plain tensor does not need"):
        open_stored_tensors(checkpoint).read("norm.weight")
    assert not marker.exists()

    # The same tensor's archive, its storage record deflated.
    plain = io.BytesIO()
    torch.save(torch.ones(256), plain)
    squeezed = io.BytesIO()
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(squeezed, "w") as target:
        for info in source.infolist():
            compression = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            target.writestr(info.filename, source.read(info), compress_type=compression)
    point_chunk_at(checkpoint, "model.norm.weight", squeezed.getvalue())
    with pytest.raises(ConfigError, match="is compressed") as error:
        open_stored_tensors(checkpoint).read("norm.weight")
    assert "planted.distcp" in str(error.value) and "\n" not in str(error.value)


def test_a_pickled_model_entry_is_refused(tmp_path):
    from titanmem.components.checkpoint_io import UnsafeCheckpointError
    from titanmem.components.stored_tensors import open_stored_tensors

    marker = tmp_path / "marker"
    dcp.save({"model": {"w": torch.ones(2), "planted": _Planted(marker)}}, checkpoint_id=str(tmp_path / "step-1"))
    with pytest.raises(UnsafeCheckpointError, match="model.planted"):
        open_stored_tensors(tmp_path / "step-1")
    assert not marker.exists()


def test_a_truncated_exported_file_is_one_line_naming_it(tmp_path):
    from titanmem.components.export import OutputTensor, write_shards
    from titanmem.components.stored_tensors import open_stored_tensors
    from titanmem.config import ConfigError

    table = torch.randn(50, 8)
    files = write_shards(tmp_path / "out", {"t": OutputTensor((50, 8), lambda a, b: table[a:b])},
                         dtype=torch.float32, max_shard_bytes=10**9)
    source = open_stored_tensors(tmp_path / "out")
    assert torch.equal(source.read("t", 3, 17), table[3:17])
    with open(files[0], "r+b") as handle:
        handle.truncate(os.path.getsize(files[0]) - 100)
    with pytest.raises(ConfigError, match="outside the file") as error:
        open_stored_tensors(tmp_path / "out")
    assert str(files[0]) in str(error.value)
