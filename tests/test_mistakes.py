"""Ordinary mistakes cost nothing: each is exit status 1, one line naming its key, file or line, no traceback, and
nothing created, changed or removed anywhere (the repository, the test's model and data, the user's files)."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from conftest import ROOT, make_hf_model, run_stage, tiny_settings, write_overlay

SKIP_IN_ROOT = {".git", ".venv", ".venv-xla", "__pycache__", ".pytest_cache"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    """A finished tiny pipeline (01-03, then two steps of 05 with a checkpoint) and the odd inputs the cases
    point at: a biased model, a model of another architecture, broken data files."""
    w = tmp_path_factory.mktemp("world")
    make_hf_model(w / "hf_source", tokenizer_dir)
    make_hf_model(w / "biased", tokenizer_dir, attention_bias=True)
    shutil.copytree(w / "hf_source", w / "biased_tensors")  # bias tensors under a config that denies them
    for f in (w / "biased").glob("*.safetensors"):
        shutil.copy(f, w / "biased_tensors" / f.name)
    other = json.loads((w / "hf_source" / "config.json").read_text())
    (w / "biased_tensors" / "config.json").write_text(json.dumps(other))
    shutil.copytree(w / "hf_source", w / "qwen")
    (w / "qwen" / "config.json").write_text(json.dumps(dict(other, architectures=["Qwen2ForCausalLM"])))
    settings = dict(
        tiny_settings(w),
        **{
            "trainer.max_steps": 2,
            "evaluation.generate.num_prompts": 0,
            "exp_manager.checkpoint_callback_params.every_n_train_steps": 2,
            "exp_manager.create_tensorboard_logger": False,
        },
    )
    overlay = write_overlay(w / "overlay.yaml", settings)
    for stage in ("01_download_data.py", "02_download_model.py", "03_convert_checkpoint.py", "05_train.py"):
        run_stage([stage, "--config", "config.yaml", "--config", str(overlay)])
    data = (w / "data" / "training.jsonl").read_text().splitlines(keepends=True)
    (w / "bad_json.jsonl").write_text("".join(data[:2]) + '{"input": "x", "output": \n' + "".join(data[2:4]))
    (w / "no_output.jsonl").write_text(data[0] + json.dumps({"input": "only a prompt"}) + "\n")
    (w / "truncated.jsonl.gz").write_bytes(gzip.compress("".join(data).encode())[:-20])
    (w / "chat.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}) + "\n"
    )
    shutil.copytree(w / "tokenizer", w / "no_template")
    for f in (w / "no_template").glob("chat_template*"):
        f.unlink()
    config = json.loads((w / "no_template" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (w / "no_template" / "tokenizer_config.json").write_text(json.dumps(config))
    mistral = dict(other, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
    (w / "mistral_config.json").write_text(json.dumps(mistral))
    (w / "gpt2_config.json").write_text(json.dumps(dict(other, architectures=["GPT2LMHeadModel"], model_type="gpt2")))
    return w


def user_dir(home):
    """A directory of the user's, with their own files in it (the thing a stage must never delete)."""
    (home / "mine").mkdir()
    (home / "mine" / "notes.txt").write_text("mine\n")
    (home / "mine" / "config.yaml").write_text("my: own config\n")
    return home / "mine"


def user_file(home):
    (home / "mine.jsonl").write_text('{"input": "mine", "output": "mine"}\n')


def tokenizer_without_json(home, world):
    (home / "tok").mkdir()
    shutil.copy(world / "tokenizer" / "tokenizer_config.json", home / "tok")


def prepared_is_a_file(home, world):
    shutil.copy(world / "data" / "training.jsonl", home / "t.jsonl")
    (home / "t.jsonl.prepared").write_text("a file of the user's\n")


def section_twice(home):
    (home / "twice.yaml").write_text("trainer:\n  max_steps: 3\ntrainer:\n  log_every_n_steps: 1\n")


def edited_output(home, world):
    """An earlier output of 01, edited by hand since (its manifest's sha256 no longer matches)."""
    for name in ("training.jsonl", "training.jsonl.manifest.json"):
        shutil.copy(world / "data" / name, home / name)
    with open(home / "training.jsonl", "a") as f:
        f.write('{"input": "my own", "output": "example"}\n')


def two_splits(home):
    import datasets

    split = datasets.Dataset.from_dict({"input": ["q"], "output": ["a"]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(home / "dd"))


def notes_in_02s_weights(home, world):
    shutil.copytree(world / "hf_weights", home / "w")
    (home / "w" / "NOTES.md").write_text("what I found\n")


def card_in_03s_export(home, world):
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(world / "overlay.yaml"),
               "--to-hf", str(home / "export")])  # fmt: skip
    (home / "export" / "MODEL_CARD.md").write_text("# my merged model\n")


@dataclass
class Case:
    id: str
    stage: str
    args: list  # after --config config.yaml --config <world>/overlay.yaml; {w} = world, {h} = home
    expect: str  # text of the one error line ({w}, {h} formatted)
    setup: object = None  # setup(home, world) makes the user's files the case needs
    plain: bool = False  # only --config config.yaml (as a new user types it), not the world's overlay


CASES = [
    # configuration: keys, types, ranges
    Case(
        "typo-key",
        "05_train.py",
        ["trainer.max_step=3"],
        "unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'?",
    ),
    Case("typo-section", "05_train.py", ["traner.max_steps=3"], "unknown key 'traner'; did you mean 'trainer'?"),
    Case("key-in-wrong-section", "01_download_data.py", ["trainer.seq_length=3"], "did you mean 'data.seq_length'?"),
    Case(
        "yaml-syntax",
        "03_convert_checkpoint.py",
        ["--config", "{h}/bad.yaml"],
        "{h}/bad.yaml:3:1: not valid YAML (expected ',' or ']', but got '<stream end>'; while parsing a flow "
        "sequence that began at line 2, column 15)",
        setup=lambda h, w: (h / "bad.yaml").write_text("data:\n  seq_length: [1, 2\n"),
    ),
    Case("yaml-override", "05_train.py", ["model.optim.betas=[0.9,"], "override 'model.optim.betas=[0.9,': the value"),
    Case("override-no-equals", "05_train.py", ["trainer.max_steps"], "override 'trainer.max_steps': expected"),
    Case("section-set", "05_train.py", ["trainer=3"], "'trainer' is a section"),
    Case("wrong-type", "05_train.py", ["data.seq_length=4k"], "'data.seq_length' must be int, got str '4k'"),
    Case("false-string", "03_convert_checkpoint.py", ["model.fuse_qkv='False'"], "'model.fuse_qkv' must be bool"),
    Case("bad-choice", "05_train.py", ["precision.type=bf16"], "'precision.type' must be one of"),
    Case("negative-lr", "05_train.py", ["model.optim.lr=-1e-4"], "'model.optim.lr' must be > 0, got -0.0001"),
    Case("negative-lr-dry-run", "05_train.py", ["model.optim.lr=-1e-4", "--dry-run"], "'model.optim.lr' must be > 0"),
    Case(
        "alpha-zero",
        "05_train.py",
        ["model_alignment_strategy.peft.lora_alpha=0"],
        "'model_alignment_strategy.peft.lora_alpha' must be > 0",
    ),
    Case(
        "dropout-one",
        "05_train.py",
        ["model_alignment_strategy.peft.lora_dropout=1"],
        "lora_dropout' must be in [0, 1)",
    ),
    Case("no-samples", "05_train.py", ["data.dev_choose_samples=0"], "'data.dev_choose_samples' must be >= 1, got 0"),
    Case(
        "beta-one",
        "05_train.py",
        ["model.optim.betas=[0.9,1.0]"],
        "every item of 'model.optim.betas' must be in [0, 1)",
    ),
    Case("eps-zero", "05_train.py", ["model.optim.eps=0"], "'model.optim.eps' must be > 0"),
    Case(
        "min-lr-above-lr",
        "05_train.py",
        ["model.optim.sched.min_lr=1"],
        "'model.optim.sched.min_lr' (1.0) must be <= 'model.optim.lr'",
    ),
    Case(
        "negative-warmup",
        "05_train.py",
        ["model.optim.sched.warmup_steps=-1"],
        "'model.optim.sched.warmup_steps' must be >= 0",
    ),
    Case("negative-seed", "05_train.py", ["seed=-1"], "'seed' must be in [0, 4294967295]"),
    Case(
        "negative-prompts",
        "05_train.py",
        ["evaluation.generate.num_prompts=-1"],
        "'evaluation.generate.num_prompts' must be >= 0",
    ),
    Case(
        "unknown-target",
        "05_train.py",
        ["model_alignment_strategy.peft.target_modules=[qkv]"],
        "unknown target(s) ['qkv']",
    ),
    Case(
        "tp-zero",
        "03_convert_checkpoint.py",
        ["distributed_strategy.tensor_model_parallel_size=0"],
        "'distributed_strategy.tensor_model_parallel_size' must be >= 1",
    ),
    Case(
        "part-size-zero",
        "01_download_data.py",
        ["data.download.part_size_mb=0"],
        "'data.download.part_size_mb' must be >= 1",
    ),
    Case("missing-config-file", "05_train.py", ["--config", "{h}/none.yaml"], "{h}/none.yaml: config file not found"),
    Case(
        "section-written-twice",
        "05_train.py",
        ["--config", "{h}/twice.yaml"],
        "{h}/twice.yaml:3:1: not valid YAML (key 'trainer' written twice)",
        setup=lambda h, w: section_twice(h),
    ),
    Case(
        "01-section-written-twice",
        "01_download_data.py",
        ["--config", "{h}/twice.yaml"],
        "{h}/twice.yaml:3:1: not valid YAML (key 'trainer' written twice)",
        setup=lambda h, w: section_twice(h),
    ),
    Case("infinite-lr", "05_train.py", ["model.optim.lr=.inf"], "'model.optim.lr' must be > 0, got inf"),
    Case(
        "infinite-neftune",
        "05_train.py",
        ["model_alignment_strategy.sft.neftune_noise_alpha=.inf"],
        "'model_alignment_strategy.sft.neftune_noise_alpha' must be > 0, got inf",
    ),
    Case(
        "decay-ends-before-warmup",
        "05_train.py",
        ["model.optim.sched.max_steps=3", "model.optim.sched.warmup_steps=5"],
        "'model.optim.sched.max_steps' (3) must be >= 'model.optim.sched.warmup_steps' (5)",
    ),
    Case("inspect-zero", "05_train.py", ["--inspect-data", "0"], "--inspect-data 0: the number of windows to show"),
    Case("inspect-negative", "05_train.py", ["--inspect-data", "-1"], "--inspect-data -1: the number of windows"),
    Case(
        "dry-run-and-inspect",
        "05_train.py",
        ["--dry-run", "--inspect-data", "1"],
        "--inspect-data and --dry-run cannot be combined",
    ),
    Case("misspelt-option", "05_train.py", ["--dry_run"], "did you mean '--dry-run'"),
    Case("laptop-first-run", "05_train.py", [], "make demo", plain=True),
    Case("04-typo", "04_precompile.sh", ["trainer.max_step=3"], "did you mean 'trainer.max_steps'?"),
    # 01: outputs that are not its own
    Case(
        "01-into-a-directory",
        "01_download_data.py",
        ["data.train_dir={h}/mine"],
        "data.train_dir: {h}/mine is a directory",
        setup=lambda h, w: user_dir(h),
    ),
    Case(
        "01-over-a-user-file",
        "01_download_data.py",
        ["data.train_dir={h}/mine.jsonl"],
        "data.train_dir: {h}/mine.jsonl exists and was not written by",
        setup=lambda h, w: user_file(h),
    ),
    Case(
        "01-over-its-source",
        "01_download_data.py",
        ["data.download.train_uri={h}/mine.jsonl", "data.train_dir={h}/mine.jsonl"],
        "is also the split's source",
        setup=lambda h, w: user_file(h),
    ),
    Case(
        "01-one-file-for-both",
        "01_download_data.py",
        ["data.val_dir={w}/data/training.jsonl"],
        "data.train_dir and data.val_dir are the same file",
    ),
    Case(
        "01-under-a-file",
        "01_download_data.py",
        ["data.train_dir={h}/mine.jsonl/t.jsonl"],
        "data.train_dir: cannot write",
        setup=lambda h, w: user_file(h),
    ),
    Case(
        "01-over-an-edited-output",
        "01_download_data.py",
        ["data.train_dir={h}/training.jsonl"],
        "data.train_dir: {h}/training.jsonl was changed since 01 wrote it",
        setup=edited_output,
    ),
    Case(
        "01-datasetdict-without-its-split",
        "01_download_data.py",
        ["data.download.val_uri={h}/dd", "data.val_dir={h}/v.jsonl"],
        "{h}/dd: a DatasetDict of splits ['train', 'validation']; name the one to read: {h}/dd:<split>",
        setup=lambda h, w: two_splits(h),
    ),
    Case(
        "01-datasetdict-split-missing",
        "01_download_data.py",
        ["data.download.val_uri={h}/dd:valid", "data.val_dir={h}/v.jsonl"],
        "{h}/dd: no split 'valid' in this DatasetDict (splits: ['train', 'validation'])",
        setup=lambda h, w: two_splits(h),
    ),
    Case(
        "01-missing-source",
        "01_download_data.py",
        ["data.download.train_uri={h}/nothing.jsonl", "data.train_dir={h}/t.jsonl"],
        "{h}/nothing.jsonl: local file not found",
    ),
    # 02
    Case(
        "02-own-weights-holding-your-notes",
        "02_download_model.py",
        ["model.hf_weights_dir={h}/w"],
        "model.hf_weights_dir: {h}/w holds NOTES.md beside what 02 wrote there",
        setup=notes_in_02s_weights,
    ),
    Case(
        "03-own-export-holding-your-card",
        "03_convert_checkpoint.py",
        ["--to-hf", "{h}/export", "--overwrite"],
        "--to-hf: {h}/export holds MODEL_CARD.md beside what 03 wrote there",
        setup=card_in_03s_export,
    ),
    Case(
        "02-weights-over-user-dir",
        "02_download_model.py",
        ["model.hf_weights_dir={h}/mine"],
        "model.hf_weights_dir: {h}/mine exists and was not written by",
        setup=lambda h, w: user_dir(h),
    ),
    Case(
        "02-tokenizer-over-user-dir",
        "02_download_model.py",
        ["data.tokenizer.type={h}/mine"],
        "data.tokenizer.type: {h}/mine exists and was not written by",
        setup=lambda h, w: user_dir(h),
    ),
    Case(
        "02-config-over-user-file",
        "02_download_model.py",
        ["model.model_config={h}/mine/config.yaml"],
        "model.model_config: {h}/mine/config.yaml exists",
        setup=lambda h, w: user_dir(h),
    ),
    Case(
        "02-nested-outputs",
        "02_download_model.py",
        ["model.hf_weights_dir={h}/w", "data.tokenizer.type={h}/w/tok"],
        "one lies inside the other",
    ),
    Case(
        "02-under-a-file",
        "02_download_model.py",
        ["model.hf_weights_dir={h}/mine.jsonl/w"],
        "model.hf_weights_dir: cannot write",
        setup=lambda h, w: user_file(h),
    ),
    Case(
        "02-missing-gguf",
        "02_download_model.py",
        ["model.download.source={h}/model.gguf"],
        "GGUF file {h}/model.gguf not found",
    ),
    Case(
        "02-bias-config",
        "02_download_model.py",
        [
            "model.download.source={w}/biased",
            "model.hf_weights_dir={h}/w",
            "data.tokenizer.type={h}/t",
            "model.model_config={h}/c.json",
        ],
        "{w}/biased: config.json sets 'attention_bias: true'",
    ),
    Case(
        "02-bias-tensors",
        "02_download_model.py",
        [
            "model.download.source={w}/biased_tensors",
            "model.hf_weights_dir={h}/w",
            "data.tokenizer.type={h}/t",
            "model.model_config={h}/c.json",
        ],
        "{w}/biased_tensors: tensor 'model.layers.0.self_attn.",
    ),
    Case(
        "02-other-architecture",
        "02_download_model.py",
        [
            "model.download.source={w}/qwen",
            "model.hf_weights_dir={h}/w",
            "data.tokenizer.type={h}/t",
            "model.model_config={h}/c.json",
        ],
        "{w}/qwen: architecture Qwen2ForCausalLM",
    ),
    # 03
    Case(
        "03-over-user-dir",
        "03_convert_checkpoint.py",
        ["exp_manager.resume_from_checkpoint={h}/mine", "--overwrite"],
        "exp_manager.resume_from_checkpoint: {h}/mine exists and was not written by",
        setup=lambda h, w: user_dir(h),
    ),
    Case(
        "03-to-hf-over-base-weights",
        "03_convert_checkpoint.py",
        ["--to-hf", "{w}/hf_weights", "--overwrite"],
        "--to-hf: {w}/hf_weights exists and was not written by",
    ),
    Case(
        "03-merge-missing-adapter",
        "03_convert_checkpoint.py",
        ["--to-hf", "{h}/merged", "--merge-adapter", "{h}/none"],
        "--merge-adapter: {h}/none holds no adapter_config.json",
    ),
    Case(
        "03-missing-model-config",
        "03_convert_checkpoint.py",
        ["model.model_config={h}/none.json"],
        "model.model_config: {h}/none.json not found",
    ),
    Case(
        "03-under-a-file",
        "03_convert_checkpoint.py",
        ["exp_manager.resume_from_checkpoint={h}/mine.jsonl/ckpt"],
        "exp_manager.resume_from_checkpoint: cannot write",
        setup=lambda h, w: user_file(h),
    ),
    # 05: inputs
    Case(
        "05-tokenizer-without-json",
        "05_train.py",
        ["data.tokenizer.type={h}/tok"],
        "data.tokenizer.type: {h}/tok has no tokenizer.json",
        setup=tokenizer_without_json,
    ),
    Case(
        "05-dry-run-tokenizer-without-json",
        "05_train.py",
        ["data.tokenizer.type={h}/tok", "--dry-run"],
        "data.tokenizer.type: {h}/tok has no tokenizer.json",
        setup=tokenizer_without_json,
    ),
    Case("05-missing-data", "05_train.py", ["data.train_dir={h}/none.jsonl"], "data file {h}/none.jsonl not found"),
    Case(
        "05-invalid-json-line",
        "05_train.py",
        ["data.train_dir={w}/bad_json.jsonl"],
        "{w}/bad_json.jsonl:3: not valid JSON",
    ),
    Case(
        "05-record-without-output",
        "05_train.py",
        ["data.train_dir={w}/no_output.jsonl"],
        "{w}/no_output.jsonl:2: fields ['input'] are neither {{input, output}} nor {{messages}}; 05 trains on",
    ),
    Case(
        "05-gz-not-from-01",
        "05_train.py",
        ["data.train_dir={w}/truncated.jsonl.gz"],
        "{w}/truncated.jsonl.gz: gzip-compressed, not JSON lines; 05 trains on",
    ),
    Case(
        "01-truncated-gz",
        "01_download_data.py",
        ["data.download.train_uri={w}/truncated.jsonl.gz", "data.train_dir={h}/t.jsonl"],
        "{w}/truncated.jsonl.gz: cannot be read",
    ),
    Case(
        "05-conversation-without-template",
        "05_train.py",
        ["data.train_dir={w}/chat.jsonl", "data.tokenizer.type={w}/no_template"],
        "{w}/chat.jsonl:1: a conversation (or data.prompt_format=chat_template) is rendered with the tokenizer's "
        "chat template",
    ),
    Case(
        "05-missing-checkpoint",
        "05_train.py",
        ["exp_manager.resume_from_checkpoint={h}/none"],
        "exp_manager.resume_from_checkpoint: {h}/none/model/",
    ),
    Case(
        "05-short-mistral-window",
        "05_train.py",
        ["model.model_config={w}/mistral_config.json"],
        "sliding_window 16 is shorter than data.seq_length 64",
    ),
    Case(
        "05-other-architecture",
        "05_train.py",
        ["model.model_config={w}/gpt2_config.json"],
        "expected a LlamaForCausalLM or MistralForCausalLM config",
    ),
    # 05: outputs
    Case(
        "05-run-dir-over-user-dir",
        "05_train.py",
        ["exp_manager.explicit_log_dir={h}/mine"],
        "exp_manager.explicit_log_dir: {h}/mine exists and was not written by",
        setup=lambda h, w: user_dir(h),
    ),
    Case(
        "05-run-dir-under-a-file",
        "05_train.py",
        ["exp_manager.explicit_log_dir={h}/mine.jsonl/run"],
        "exp_manager.explicit_log_dir: cannot write",
        setup=lambda h, w: user_file(h),
    ),
    Case(
        "05-cache-under-a-file",
        "05_train.py",
        ["data.cache_dir={h}/mine.jsonl/cache"],
        "data.cache_dir: cannot write",
        setup=lambda h, w: user_file(h),
    ),
    Case(
        "05-prepared-is-a-user-file",
        "05_train.py",
        ["data.train_dir={h}/t.jsonl"],
        "data.train_dir: {h}/t.jsonl.prepared exists and was not written by",
        setup=prepared_is_a_file,
    ),
    # 05: a resume that is not the same run
    Case(
        "05-finished-run",
        "05_train.py",
        ["exp_manager.explicit_log_dir={w}/run"],
        "run directory {w}/run holds a finished run",
    ),
    Case(
        "05-fresh-start-refused",
        "05_train.py",
        ["exp_manager.explicit_log_dir={w}/run", "exp_manager.resume_if_exists=false", "trainer.max_steps=9"],
        "holds a finished run (final/adapter); remove it, choose another exp_manager.explicit_log_dir, or set "
        "exp_manager.resume_if_exists=true to go on",
    ),
    Case(
        "05-dry-run-on-a-finished-run",
        "05_train.py",
        ["exp_manager.explicit_log_dir={w}/run", "--dry-run"],
        "the plan fits, but a launch would stop at its run directory: run directory {w}/run holds a finished run",
    ),
    Case(
        "05-resume-other-settings",
        "05_train.py",
        [
            "exp_manager.explicit_log_dir={w}/run",
            "trainer.max_steps=4",
            "model.optim.lr=0.05",
            "model_alignment_strategy.peft.lora_rank=8",
        ],
        "model.optim.lr: 0.01 -> 0.05; model_alignment_strategy.peft.lora_rank: 16 -> 8",
    ),
    Case(
        "05-resume-other-tokenizer",
        "05_train.py",
        ["exp_manager.explicit_log_dir={w}/run", "trainer.max_steps=4", "data.tokenizer.type={w}/hf_source"],
        "data.tokenizer.type: '{w}/tokenizer' -> '{w}/hf_source'",
    ),
]


def snapshot(root, skip=()):
    """{relative path: "dir" or (size, modification time in ns)} of everything under root: any file or directory
    added or removed, and any file written to (even with the same bytes), shows; nothing large is read. (A
    directory's own time changes with a temporary entry made and removed again, which leaves nothing behind.)"""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        out[os.path.relpath(dirpath, root)] = "dir"
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_the_table_has_at_least_forty_cases_across_every_stage():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.stage for c in CASES} == {
        "01_download_data.py",
        "02_download_model.py",
        "03_convert_checkpoint.py",
        "04_precompile.sh",
        "05_train.py",
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_is_one_line_naming_its_cause_and_changes_nothing(world, tmp_path, tmp_path_factory, case):
    home = tmp_path / "home"
    home.mkdir()
    if case.setup:
        case.setup(home, world)
    fill = lambda s: s.format(w=world, h=home)  # noqa: E731
    configs = ["--config", "config.yaml"] + ([] if case.plain else ["--config", str(world / "overlay.yaml")])
    if case.stage == "05_train.py" and not case.plain:  # a new run, unless the case names the world's finished one
        configs.append(f"exp_manager.explicit_log_dir={home / 'run'}")
    args = configs + [fill(a) for a in case.args]
    command = ["bash", case.stage, *args] if case.stage.endswith(".sh") else [sys.executable, case.stage, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(
        HOME=str(home),
        HF_HOME=str(tmp_path_factory.mktemp("hf_home")),
        PYTHONDONTWRITEBYTECODE="1",
        DEMO_GGUF=str(home / "none.gguf"),
    )
    before = [snapshot(ROOT, SKIP_IN_ROOT), snapshot(world), snapshot(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert fill(case.expect) in errors[0]
    assert [snapshot(ROOT, SKIP_IN_ROOT), snapshot(world), snapshot(tmp_path)] == before
