"""Device selection and compiled layers.

Only the detection of Neuron hosts is faked (a device directory with a `neuron0` file); everything that trains
runs for real on this CPU."""

import pytest
from conftest import run_stage, train

NO_GEN = ["evaluation.generate.num_prompts=0"]


def settings(train_mod, overlay, *overrides):
    return train_mod.resolve(train_mod.load_config(["config.yaml", str(overlay)], list(overrides)), train_mod.SCHEMA)


def test_auto_takes_the_cpu_on_a_host_without_accelerators(train_mod, pipeline):
    _, overlay = pipeline
    assert train_mod.native_accelerator() is None
    assert train_mod.pick_device(settings(train_mod, overlay, "trainer.accelerator=auto")).type == "cpu"


@pytest.mark.parametrize("accelerator, names", [("neuron", "torch-neuronx"), ("cuda", "CUDA")])
def test_an_accelerator_that_is_not_here_fails_fast_and_writes_nothing(pipeline, accelerator, names):
    work, overlay = pipeline
    run_dir = work / f"no-{accelerator}"
    proc = run_stage(
        [
            "05_train.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            f"trainer.accelerator={accelerator}",
            f"exp_manager.explicit_log_dir={run_dir}",
        ],
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and names in proc.stderr and f"trainer.accelerator={accelerator}" in proc.stderr
    assert not run_dir.exists()


def test_a_neuron_host_without_a_usable_backend_is_refused_not_trained_on_the_cpu(
    train_mod, pipeline, tmp_path, monkeypatch
):
    work, overlay = pipeline
    (tmp_path / "neuron0").touch()
    monkeypatch.setattr(train_mod, "NEURON_DEVICE_DIR", str(tmp_path))
    run_dir = work / "neuron-host"
    with pytest.raises(train_mod.StageError, match="has Neuron devices .* install torch-neuronx"):
        train_mod.main(
            [
                "--config",
                "config.yaml",
                "--config",
                str(overlay),
                "trainer.accelerator=auto",
                f"exp_manager.explicit_log_dir={run_dir}",
            ]
        )
    assert not run_dir.exists()
    # Asked for explicitly, the CPU is still allowed there.
    assert train_mod.pick_device(settings(train_mod, overlay, "trainer.accelerator=cpu")).type == "cpu"


def losses(records, key="loss"):
    return [r[key] for r in records if key in r]


def test_compiled_layers_train_like_eager_and_compile_only_in_the_first_step(pipeline):
    work, overlay = pipeline
    exact = ["model_alignment_strategy.peft.lora_dropout=0.0", "trainer.max_steps=3", *NO_GEN]
    eager = train(work, overlay, "eager-masked", "model.attention=masked", *exact)
    compiled = train(work, overlay, "compiled", "trainer.compile=true", *exact)
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)
    assert losses(compiled, "val_loss") == pytest.approx(losses(eager, "val_loss"), abs=1e-4)
    counts = [r["compiled_graphs"] for r in compiled if "loss" in r]
    assert counts[0] > 0 and counts == [counts[0]] * 3, f"graphs compiled after each step: {counts}"


def test_a_compiled_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_one(pipeline):
    work, overlay = pipeline
    fixed = [
        "trainer.compile=true",
        "model.optim.sched.max_steps=4",
        "trainer.val_check_interval=100",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
        *NO_GEN,
    ]  # dropout on
    whole = train(work, overlay, "compiled-whole", "trainer.max_steps=4", *fixed)
    train(work, overlay, "compiled-resumed", "trainer.max_steps=2", *fixed)
    resumed = train(work, overlay, "compiled-resumed", "trainer.max_steps=4", *fixed)
    assert losses(resumed) == losses(whole) and len(losses(whole)) == 4
    assert losses(resumed, "grad_norm") == losses(whole, "grad_norm")
    assert losses(resumed, "val_loss")[-1] == losses(whole, "val_loss")[-1]
