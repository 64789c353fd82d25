"""The XLA path (torch-xla on XLA's CPU device, as on Trainium but without one): static graphs, same numbers.

Run by `make test-xla`, which builds .venv-xla (torch 2.9.0 + torch-xla 2.9.0); skipped elsewhere."""

import json
import os
import sys

import pytest

from conftest import run_stage

pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

STEADY = ["trainer.max_steps=5", "trainer.log_every_n_steps=1", "trainer.val_check_interval=100",
          "model_alignment_strategy.peft.lora_dropout=0.0", "data.global_batch_size=4", "model.optim.lr=2e-3",
          "evaluation.generate.num_prompts=0", "model.optim.sched.warmup_steps=3"]


def run(work, overlay, name, *overrides):
    env = dict(os.environ, PJRT_DEVICE="CPU")
    proc = run_stage(["05_train.py", "--config", "config.yaml", "--config", str(overlay),
                      f"exp_manager.explicit_log_dir={work / name}", f"xla.cache_dir={work / 'xla-cache'}",
                      *STEADY, *overrides], env=env)
    return proc, [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]


def test_five_xla_steps_compile_nothing_new_after_the_second_and_match_eager(pipeline):
    work, overlay = pipeline
    _, xla = run(work, overlay, "xla", "trainer.accelerator=xla")
    _, eager = run(work, overlay, "eager", "trainer.accelerator=cpu")
    steps = [r for r in xla if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    compiles = [r["xla_compiles"] for r in steps]
    assert compiles[1] > 0 and compiles[1:] == [compiles[1]] * 4, f"graphs compiled per step: {compiles}"
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in eager if "loss" in r], abs=1e-4)
    assert [r["val_loss"] for r in xla if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in eager if "val_loss" in r], abs=1e-4)


def test_xla_with_activation_checkpointing_matches_eager(pipeline):
    work, overlay = pipeline
    _, xla = run(work, overlay, "xla-ckpt", "trainer.accelerator=xla", "model.activations_checkpoint=true")
    _, eager = run(work, overlay, "eager-ckpt", "trainer.accelerator=cpu")
    assert [r["loss"] for r in xla if "loss" in r] == pytest.approx([r["loss"] for r in eager if "loss" in r], abs=1e-4)


def test_autocast_on_xla_trains_fp32_lora_over_a_bf16_base_like_eager_autocast(pipeline):
    work, overlay = pipeline
    _, xla = run(work, overlay, "xla-bf16", "trainer.accelerator=xla", "precision.type=autocast")
    _, eager = run(work, overlay, "eager-bf16", "trainer.accelerator=cpu", "precision.type=autocast")
    # bf16 kernels differ between XLA and eager CPU, so only bf16-level agreement is expected.
    assert [r["loss"] for r in xla if "loss" in r] == pytest.approx([r["loss"] for r in eager if "loss" in r], abs=3e-2)
    assert list((work / "xla-cache").iterdir()), "the persistent XLA cache stayed empty"


def test_04_fills_the_xla_cache_with_the_training_steps(pipeline, tmp_path):
    work, overlay = pipeline
    env = dict(os.environ, PJRT_DEVICE="CPU", NPROC_PER_NODE="1", PRECOMPILE_STEPS="2", MASTER_PORT="41917",
               PYTHON=sys.executable)
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml", "--config", str(overlay),
                      f"xla.cache_dir={tmp_path / 'cache'}"], env=env)
    assert "fill the persistent XLA cache" in proc.stdout
    assert int(proc.stdout.rsplit("graphs compiled:", 1)[1].split()[0]) > 0
    assert list((tmp_path / "cache").iterdir())


def test_checkpoints_on_xla_compile_once_and_resume_exactly(pipeline):
    work, overlay = pipeline
    fixed = ["trainer.accelerator=xla", "model.optim.sched.max_steps=5",
             "exp_manager.checkpoint_callback_params.every_n_train_steps=2"]
    _, whole = run(work, overlay, "xla-whole", *fixed)
    compiles = [r["xla_compiles"] for r in whole if "loss" in r]
    assert compiles[2:] == [compiles[2]] * 3, f"graphs compiled per step: {compiles}"  # first checkpoint: step 2
    run(work, overlay, "xla-resumed", *fixed, "trainer.max_steps=4")
    proc, resumed = run(work, overlay, "xla-resumed", *fixed)
    assert "resuming from" in proc.stdout
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in whole]
