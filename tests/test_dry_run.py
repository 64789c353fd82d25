"""05 --dry-run: every input checked and the per-rank memory estimated before any training starts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_stage, make_hf_model, run_stage, tiny_settings, write_overlay

LLAMA3_8B = dict(
    vocab=128256,
    hidden=4096,
    inter=14336,
    layers=32,
    heads=32,
    kv_heads=8,
    head_dim=128,
    eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    tie=False,
)


def settings(train_mod, overlay, *overrides):
    return train_mod.resolve(train_mod.load_config(["config.yaml", str(overlay)], list(overrides)), train_mod.SCHEMA)


def dry(overlay, *overrides, check=True):
    return run_stage(
        ["05_train.py", "--config", "config.yaml", "--config", str(overlay), "--dry-run", *overrides], check=check
    )


def test_dry_run_reports_checkpoint_data_and_memory_and_trains_nothing(pipeline):
    work, overlay = pipeline
    out = dry(overlay, f"exp_manager.explicit_log_dir={work / 'dry'}").stdout
    assert "checkpoint: 1 shard(s)" in out and "float32" in out
    assert "train: 24 of 1200 records" in out and "supervised of" in out and "filled" in out
    assert "memory per rank" in out and "total with checkpointing" in out and "dry run: fits" in out
    assert not (work / "dry").exists()


def test_dry_run_refuses_a_configuration_that_does_not_fit(pipeline):
    work, overlay = pipeline
    proc = dry(overlay, "trainer.device_memory_gib=0.0001", check=False)
    assert proc.returncode != 0
    assert "needs about" in proc.stderr and "the device has 0.00 GiB" in proc.stderr


def test_dry_run_names_a_missing_shard(pipeline, tmp_path):
    work, overlay = pipeline
    run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            f"exp_manager.resume_from_checkpoint={tmp_path / 'tp2'}",
            "distributed_strategy.tensor_model_parallel_size=2",
        ]
    )
    (tmp_path / "tp2" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt").unlink()
    proc = dry(
        overlay,
        f"exp_manager.resume_from_checkpoint={tmp_path / 'tp2'}",
        "distributed_strategy.tensor_model_parallel_size=2",
        check=False,
    )
    assert proc.returncode != 0 and "dp_rank_00_tp_rank_00_pp_rank_00.pt not found" in proc.stderr


LLAMA31_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def plan(tmp_path, *overrides):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_70B))
    return run_stage(
        [
            "05_train.py",
            "--config",
            "config.yaml",
            f"model.model_config={tmp_path / 'config.json'}",
            f"exp_manager.resume_from_checkpoint={tmp_path / 'not-converted'}",
            f"data.tokenizer.type={tmp_path / 'no-tokenizer'}",
            f"data.train_dir={tmp_path / 'no.jsonl'}",
            f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
            "--dry-run",
            *overrides,
        ],
        check=False,
    )


def test_a_plan_needs_only_the_model_config_and_says_what_it_skipped(tmp_path):
    """Llama-3.1-70B on trn1 (TP 32, KV heads copied 4 times), planned on this CPU host before anything exists."""
    proc = plan(tmp_path, "trainer.accelerator=xla", "model.activations_checkpoint=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "skipped: tokenizer and data" in out and "skipped: checkpoint shards" in out
    assert "device memory                         16.00 GiB (trn1 NeuronCore datasheet)" in out
    rows = {int(line.split()[0]): line for line in out.splitlines() if line.strip()[:1].isdigit() and "  " in line}
    assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64] and "<- this config" in rows[32]
    assert rows[1].split()[3] == "no" and rows[32].split()[5] == "fits"
    assert "spans" not in proc.stderr  # TP 32: one trn1.32xlarge
    assert not (tmp_path / "run").exists()


def test_a_trn2_tensor_parallel_group_over_several_chips_is_warned_about(tmp_path):
    proc = plan(
        tmp_path,
        "trainer.accelerator=neuron",
        "distributed_strategy.tensor_model_parallel_size=16",
        "distributed_strategy.kv_replicator=2",
        "distributed_strategy.hw_backend=trn2",
        "model.activations_checkpoint=true",
    )
    assert "warning: TP 16 spans 4 trn2 chips (4 logical cores per chip at LNC 2)" in proc.stderr
    assert "24.00 GiB (trn2 NeuronCore datasheet, per logical core at LNC 2)" in proc.stdout


def test_a_tensor_parallel_group_over_two_trn1_instances_is_warned_about_and_the_plan_says_what_it_assumes(tmp_path):
    """Llama-3.1-70B's 64 Q heads allow TP 64, which on trn1.32xlarge (32 NeuronCores) spans two instances."""
    proc = plan(
        tmp_path,
        "trainer.accelerator=xla",
        "distributed_strategy.tensor_model_parallel_size=64",
        "distributed_strategy.kv_replicator=8",
        "model.activations_checkpoint=true",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: TP 64 spans 2 trn1 instances (32 cores each)" in proc.stderr
    assert "assumes no sequence parallelism" in proc.stdout and "no fused attention" in proc.stdout
    assert "20% margin comes from steps measured on the CPU" in proc.stdout


def test_dry_run_checks_every_tensor_parallel_shard(pipeline):
    work, overlay = pipeline
    run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            f"exp_manager.resume_from_checkpoint={work / 'dry-tp2'}",
            "distributed_strategy.tensor_model_parallel_size=2",
        ]
    )
    shard = work / "dry-tp2" / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    state = torch.load(shard, weights_only=True)
    state["model.norm.weight"] = state["model.norm.weight"][:-1]
    torch.save(state, shard)
    manifest = json.loads((work / "dry-tp2" / "manifest.json").read_text())
    manifest["files"][f"model/{shard.name}"]["bytes"] = shard.stat().st_size
    (work / "dry-tp2" / "manifest.json").write_text(json.dumps(manifest))
    proc = dry(
        overlay,
        f"exp_manager.resume_from_checkpoint={work / 'dry-tp2'}",
        "distributed_strategy.tensor_model_parallel_size=2",
        check=False,
    )
    assert proc.returncode != 0
    assert "tp_rank_01" in proc.stderr and "'model.norm.weight' has shape [63], expected [64]" in proc.stderr


def test_llama3_8b_at_tp32_on_trn1_needs_a_sixteenth_of_the_base_per_rank(train_mod, pipeline):
    work, overlay = pipeline
    c = train_mod.resolve(
        train_mod.load_config(
            ["config.yaml", str(overlay)],
            [
                "precision.type=autocast",
                "data.seq_length=4096",
                "data.micro_batch_size=1",
                "distributed_strategy.tensor_model_parallel_size=32",
                "distributed_strategy.kv_replicator=4",
                "model_alignment_strategy.peft.target_modules=[qkv_proj]",
            ],
        ),
        train_mod.SCHEMA,
    )
    est = train_mod.memory_estimate(train_mod.Arch(**LLAMA3_8B), c, 32, supervised_per_row=1024, trainium=True)
    # Per rank: 1/32 of the 8.03 B weights, plus the K/V projections copied 4x (3 more copies of 32 layers x
    # 2 x 1024 x 4096 / 32), in bf16.
    expected = (8_030_261_248 + 3 * 32 * 2 * 1024 * 4096) / 32 * 2
    assert est["frozen base"] == pytest.approx(expected, rel=1e-3)
    assert est["activations, checkpointed"] < est["activations"] / 4
    assert sum(est.values()) - est["activations"] < 16 * 2**30  # fits a NeuronCore-v2 with checkpointing


def tutorial_settings(train_mod, *overrides):
    return train_mod.resolve(train_mod.load_config(["config.yaml"], list(overrides)), train_mod.SCHEMA)


def test_the_default_activation_checkpointing_is_what_the_estimate_needs_on_trn1_at_tp32(train_mod):
    """config.yaml's default follows the estimate for its own settings: checkpointing on exactly when the
    estimate without it, plus the estimate's error, does not fit a trn1 NeuronCore."""
    c = tutorial_settings(train_mod)
    est = train_mod.memory_estimate(train_mod.Arch(**LLAMA3_8B), c, 32, supervised_per_row=1024, trainium=True)
    plain = sum(v for k, v in est.items() if k != "activations, checkpointed") / 2**30
    needed = plain * (1 + train_mod.ESTIMATE_ERROR) > train_mod.NEURONCORE["trn1"][2]
    assert c["model.activations_checkpoint"] == needed, f"estimate without checkpointing: {plain:.2f} GiB"


def test_the_estimate_counts_dropout_masks_and_the_neuron_runtime_reserve(train_mod):
    with_dropout = tutorial_settings(train_mod, "model_alignment_strategy.peft.lora_dropout=0.1")
    without = tutorial_settings(train_mod, "model_alignment_strategy.peft.lora_dropout=0.0")
    est = train_mod.memory_estimate(
        train_mod.Arch(**LLAMA3_8B), with_dropout, 32, supervised_per_row=1024, trainium=True
    )
    base = train_mod.memory_estimate(train_mod.Arch(**LLAMA3_8B), without, 32, supervised_per_row=1024, trainium=True)
    # qkv_proj's input (hidden 4096) per token and layer: its dropped bf16 copy and a one-byte keep mask.
    assert est["activations"] - base["activations"] == 32 * 4096 * 4096 * (2 + 1)
    assert est["runtime reserve"] == train_mod.NEURON_RUNTIME_RESERVE_GIB * 2**30
    assert (
        train_mod.memory_estimate(train_mod.Arch(**LLAMA3_8B), with_dropout, 32, 1024, trainium=False)[
            "runtime reserve"
        ]
        == 0
    )


def test_the_estimate_is_within_its_stated_error_of_a_measured_step(train_mod, tmp_path, tokenizer_dir):
    """The memory one fp32 CPU training step really takes (model, LoRA and AdamW state, activations and
    temporaries: the process's peak resident memory over its baseline, in a fresh process, glibc returning every
    freed block of 64 KiB or more) against the dry run's estimate for the same model and micro-batch."""
    # Llama 3's proportions at a small scale: MLP 3.5x hidden, 4 Q heads per KV head, many layers (what one
    # layer's backward holds at a time is then a small part, as at 32 layers), a vocabulary larger than hidden.
    make_hf_model(
        tmp_path / "hf_source",
        tokenizer_dir,
        hidden_size=256,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=16,
        max_position_embeddings=1024,
        vocab_size=16384,
    )
    settings = dict(
        tiny_settings(tmp_path),
        **{
            "data.seq_length": 1024,
            "data.micro_batch_size": 2,
            "data.dev_choose_samples": 400,
            "model_alignment_strategy.peft.lora_dropout": 0.05,
            "model.attention": "masked",
        },
    )
    overlay = write_overlay(tmp_path / "overlay.yaml", settings)
    args = ["--config", "config.yaml", "--config", str(overlay)]
    for stage in ("01_download_data.py", "02_download_model.py", "03_convert_checkpoint.py"):
        run_stage([stage, *args])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "step_memory.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = got["peak"] - got["baseline"]
    c = train_mod.resolve(train_mod.load_config(["config.yaml", str(overlay)], []), train_mod.SCHEMA)
    arch = train_mod.read_model_config(c["model.model_config"])
    est = train_mod.memory_estimate(arch, c, 1, got["supervised_per_row"], trainium=False)
    estimated = est["frozen base"] + est["LoRA weights, gradients, AdamW"] + est["activations"]
    assert abs(estimated - measured) / measured <= train_mod.ESTIMATE_ERROR, (estimated, measured, est)


def test_the_dry_run_plans_a_trn2_logical_core(train_mod, pipeline, monkeypatch):
    _, overlay = pipeline
    c = settings(train_mod, overlay, "trainer.accelerator=neuron")
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    assert train_mod.device_memory(c) == (24, "trn2 NeuronCore datasheet, per logical core at LNC 2")
    assert json.dumps(train_mod.NEURONCORE["trn2"][:2]) == "[166.75, 45.25]"  # 667 / 181 TFLOPS over 4 cores


def test_one_physical_core_per_process_halves_memory_and_peak(train_mod, pipeline, monkeypatch):
    """NEURON_LOGICAL_NC_CONFIG=1: each process has one of a trn2 chip's 8 NeuronCores, not 2 of them."""
    _, overlay = pipeline
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    c = settings(train_mod, overlay, "trainer.accelerator=neuron")
    assert train_mod.device_memory(c) == (12, "trn2 NeuronCore datasheet, per logical core at LNC 1")
    assert train_mod.neuron_datasheet("trn2") == (166.75 / 2, 45.25 / 2, 12)
    assert train_mod.neuron_datasheet("trn1") == (95, 23.75, 16)  # trn1 has no logical cores


# SmolLM2-135M-Instruct's config.json (the demo's model): 9 Q heads over 3 KV heads.
SMOLLM2 = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
)


def documented_demo_launches():
    """The arguments of every documented command that trains the demo with 05 (README, 05's --help)."""
    import re

    texts = [(ROOT / "README.md").read_text(), load_stage("05_train.py").__doc__]
    for text in texts:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            if "05_train.py --config config.yaml --config demo.yaml" in line:
                yield line.split("05_train.py", 1)[1].split("(")[0].split("#")[0].split()


def test_every_documented_demo_launch_plans_on_the_demo_model(tmp_path):
    """Each documented way to train the demo gets through --dry-run on SmolLM2-135M's shapes (a TP of 2, which 9
    heads do not split into, did not)."""
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    launches = list(documented_demo_launches())
    assert len(launches) >= 3 and any("distributed_strategy.tensor_model_parallel_size=3" in a for a in launches)
    for args in launches:
        proc = run_stage(
            [
                "05_train.py",
                *args,
                f"model.model_config={tmp_path / 'config.json'}",
                f"exp_manager.resume_from_checkpoint={tmp_path / 'not-converted'}",
                f"data.tokenizer.type={tmp_path / 'no-tokenizer'}",
                f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
                "--dry-run",
            ],
            check=False,
        )
        assert proc.returncode == 0, f"{args}: {proc.stderr[-1000:]}"
