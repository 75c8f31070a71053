"""titanmem models in Hugging Face transformers and back: an `export.format = "hf"` folder loads with
`AutoModelForCausalLM.from_pretrained` and gives titanmem's logits and greedy tokens; a Hugging Face Llama folder
starts a titanmem run (dense, or memory-augmented) with transformers' logits."""

import json

import pytest
import torch
import transformers  # the dev extra installs it
from helpers import assert_close_in_scale, check_command_line, make_config, train_tiny_run

from titanmem.config import ConfigError

# Debug-model logits are O(1-10); a 6-block fp32 forward in another library (its own RMSNorm, RoPE tables and
# attention kernel) moves them by a few float32 roundings of the largest terms, far below 1e-5 of their scale.
LOGIT_BOUND = 1e-5
VARIANTS = {
    "dense": {"memory": {"enabled": False}},
    "memory_plus": {"memory": {"enabled": True}},
    "pkm": {"memory": {"enabled": True, "swilu": False, "qk_norm": True, "gated": True}},
}
PROMPTS = ["The capital of France is", "In 1869 the periodic table", "Water boils at"]


def variant_argv(folder, variant: str, *extra) -> list[str]:
    argv = ["--job.dump_folder", str(folder), "--training.device", "cpu", "--training.seq_len", "32",
            "--checkpoint.enable"]
    for key, value in VARIANTS[variant]["memory"].items():
        argv += [f"--memory.{key}", str(value).lower()]
    return [*argv, *extra]


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """A 3-step run of the variant, its titanmem model (the checkpoint), and its hf export."""
    from titanmem.build import build_run
    from titanmem.config import build_config
    from titanmem.export import main
    from titanmem.plan import resolve_plan

    variant = request.param
    root = tmp_path_factory.mktemp(f"hf-{variant}")
    train_tiny_run(root / "run", checkpoint={"enable": True, "interval": 3}, **VARIANTS[variant])
    out = root / "hf"
    assert main(variant_argv(root / "run", variant, "--export.folder", str(out), "--export.format", "hf",
                             "--export.max_shard_gb", "0.01")) == 0
    config, _ = build_config(variant_argv(root / "run", variant))
    run = build_run(resolve_plan(config, "eval"))
    run.model.eval()
    return variant, root, out, run


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                             dtype=torch.float32).eval()


def test_transformers_loads_the_folder_and_gives_titanmems_logits(exported):
    variant, _, out, run = exported
    config = json.loads((out / "config.json").read_text())
    if variant == "dense":
        # A plain Llama: no code of ours in the folder.
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not list(out.glob("*.py"))
    else:
        assert config["model_type"] == "titanmem" and (out / "titanmem_memory.py").is_file()
        # Standalone: the memory layer's code imports nothing of titanmem.
        assert "titanmem." not in "".join(line for line in (out / "titanmem_memory.py").read_text().splitlines()
                                          if line.startswith(("import", "from")))
    model = load_hf(out)
    vocab = run.tokenizer.vocab_size
    assert model.config.vocab_size == vocab
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(tokens).logits
        ours = run.model(tokens)[..., :vocab]
    assert_close_in_scale(theirs, ours, LOGIT_BOUND, variant)


def test_greedy_generate_gives_the_tokens_of_titanmem_generate(exported, capsys):
    from titanmem.eval.decode import generate
    from titanmem.generate import main as generate_main

    variant, root, out, run = exported
    model = load_hf(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours = generate(run.model, [run.tokenizer.encode(p) for p in PROMPTS], 12, run.tokenizer.eos_id,
                    torch.device("cpu"), vocab_size=run.tokenizer.vocab_size)
    for prompt, expected in zip(PROMPTS, ours):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == run.tokenizer.encode(prompt)
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0]
        new = new[ids.shape[1]:].tolist()
        if run.tokenizer.eos_id in new:
            new = new[: new.index(run.tokenizer.eos_id)]
        assert new == expected, prompt
    # The command line's output is the same text.
    argv = variant_argv(root / "run", variant, "--generate.prompts", json.dumps(PROMPTS), "--generate.max_new_tokens",
                        "12")
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out
    for prompt, expected in zip(PROMPTS, ours):
        assert f"{prompt}{run.tokenizer.decode(expected)}" in printed


def test_an_hf_export_reads_back_into_titanmem_bit_for_bit(exported):
    from titanmem.train import Trainer

    variant, root, out, run = exported
    trainer = Trainer(make_config(root / f"back-{id(out)}", training={"steps": 1, "seq_len": 32},
                                  checkpoint={"enable": True, "initial_load_path": str(out)}, **VARIANTS[variant]))
    try:
        trainer._initial_load(trainer.plan.initial_load)
        vocab = run.tokenizer.vocab_size
        original = dict(run.model.named_parameters())
        for name, param in trainer.model.named_parameters():
            if name in ("tok_embeddings.weight", "output.weight"):
                # The folder holds the tokenizer's rows; titanmem's padding rows keep their initialisation.
                assert torch.equal(param[:vocab], original[name][:vocab]), name
            else:
                assert torch.equal(param, original[name]), name
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory):
    """A small random `LlamaForCausalLM` of the debug flavor's shape and the bundled tokenizer's vocabulary, saved as
    a Hugging Face folder (safetensors), as a pretrained Llama would come."""
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=4097, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # not HF's small init: make every weight matter to the logits
            param.normal_(0, 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_a_pretrained_llama_starts_a_dense_run_with_its_logits(pretrained_llama, tmp_path):
    from titanmem.train import Trainer

    folder, llama = pretrained_llama
    trainer = Trainer(make_config(tmp_path / "run", training={"steps": 1, "seq_len": 32},
                                  checkpoint={"enable": True, "initial_load_path": str(folder)}))
    try:
        trainer._initial_load(trainer.plan.initial_load)
        tokens = torch.randint(0, 4097, (2, 32), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert_close_in_scale(trainer.model(tokens)[..., :4097], llama(tokens).logits, LOGIT_BOUND)
    finally:
        trainer.close()


def test_a_pretrained_llama_fills_everything_but_the_memory_of_a_memory_run(pretrained_llama, tmp_path):
    from titanmem.components.hf_checkpoint import hf_name, rope_heads, rope_to_hf
    from titanmem.train import Trainer

    folder, llama = pretrained_llama
    sections = dict(training={"steps": 1, "seq_len": 32}, memory={"enabled": True})
    fresh = Trainer(make_config(tmp_path / "fresh", **sections))
    trainer = Trainer(make_config(tmp_path / "run", checkpoint={"enable": True, "initial_load_path": str(folder)},
                                  **sections))
    try:
        trainer._initial_load(trainer.plan.initial_load)
        theirs = dict(llama.named_parameters())
        initial = dict(fresh.model.named_parameters())
        layers = trainer.model.args.memory.layers
        memory = {f"layers.{layer}.feed_forward." for layer in layers} | {"memory_values."}
        for name, param in trainer.model.named_parameters():
            if any(name.startswith(prefix) for prefix in memory):
                assert torch.equal(param, initial[name]), f"{name} keeps its own initialisation"
                continue
            stored = theirs[hf_name(name)]
            heads = rope_heads(name, trainer.model.args)
            ours = rope_to_hf(param, heads) if heads else param
            assert torch.equal(ours[: stored.shape[0]], stored), name
        # And the run trains from there.
        assert trainer.train()
    finally:
        trainer.close()
        fresh.close()


def test_rope_layouts_are_inverse_and_keep_attention_scores():
    from titanmem.components.hf_checkpoint import rope_from_hf, rope_to_hf

    weight = torch.randn(3 * 10, 7, dtype=torch.float64)
    assert torch.equal(rope_from_hf(rope_to_hf(weight, 3), 3), weight)
    assert not torch.equal(rope_to_hf(weight, 3), weight)


def edited_llama(source, tmp_path, **changes):
    folder = tmp_path / "edited"
    folder.mkdir()
    for file in source.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, words", [
    ({"hidden_size": 512}, "hidden_size = 512"),
    ({"num_key_value_heads": 2}, "num_key_value_heads = 2"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"model_type": "mistral"}, "'mistral' model"),
    ({"vocab_size": 128256}, "set model.vocab_size to 128256"),
], ids=["width", "kv-heads", "rope-scaling", "not-llama", "vocabulary"])
def test_a_llama_of_another_shape_is_one_line_before_the_build(pretrained_llama, tmp_path, changes, words):
    folder = edited_llama(pretrained_llama[0], tmp_path, **changes)
    argv = ["--job.dump_folder", str(tmp_path / "run"), "--training.device", "cpu", "--checkpoint.enable",
            "--checkpoint.initial_load_path", str(folder)]
    with pytest.raises(ConfigError, match="checkpoint.initial_load_path") as error:
        check_command_line(argv)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_llama_with_pickled_weights_only_is_refused(pretrained_llama, tmp_path):
    from titanmem.train import Trainer

    folder = edited_llama(pretrained_llama[0], tmp_path)
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    trainer = Trainer(make_config(tmp_path / "run", training={"steps": 1, "seq_len": 32},
                                  checkpoint={"enable": True, "initial_load_path": str(folder)}))
    try:
        with pytest.raises(ConfigError, match="does not unpickle .bin files"):
            trainer._initial_load(trainer.plan.initial_load)
    finally:
        trainer.close()


def test_exporting_a_hugging_face_folder_is_one_line(pretrained_llama, tmp_path, capsys):
    from titanmem.export import main

    argv = ["--job.dump_folder", str(tmp_path / "run"), "--training.device", "cpu", "--checkpoint.enable",
            "--checkpoint.initial_load_path", str(pretrained_llama[0]), "--export.folder", str(tmp_path / "out")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "Hugging Face model folder" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("plan", [{"dp_shard": 2, "mp": 2}, {"tp": 2}], ids=["fsdp2-mp2", "tp2"])
def test_a_pretrained_llama_fills_a_sharded_plan_as_it_fills_one_process(pretrained_llama, tmp_path, plan):
    """Each rank reads only its blocks of the Hugging Face tensors (the query and key rows reordered first): the
    sharded run, saved and read back whole, holds the weights of the one-process import."""
    from helpers import launch_ranks, resave_worker

    from titanmem.build import build_run
    from titanmem.config import build_config
    from titanmem.plan import resolve_plan
    from titanmem.train import Trainer

    folder = pretrained_llama[0]
    sections = dict(training={"steps": 1, "seq_len": 32, "local_batch_size": 1}, memory={"enabled": True},
                    checkpoint={"enable": True, "initial_load_path": str(folder)}, parallelism=plan)
    launch_ranks(resave_worker, 2, str(tmp_path / "sharded"), sections)
    config, _ = build_config(["--job.dump_folder", str(tmp_path / "sharded"), "--memory.enabled", "--training.device",
                              "cpu", "--training.seq_len", "32", "--checkpoint.enable"])
    sharded = dict(build_run(resolve_plan(config, "eval")).model.named_parameters())
    single = Trainer(make_config(tmp_path / "single", **{**sections, "parallelism": {}}))
    try:
        single._initial_load(single.plan.initial_load)
        for name, param in single.model.named_parameters():
            assert torch.equal(sharded[name], param), name
    finally:
        single.close()
