"""Device selection, the attention choices and compiled layers.

Only the detection of Neuron hosts is faked (a device directory with a `neuron0` file); everything that trains
runs for real on this CPU."""

import json

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


@pytest.mark.parametrize("packing, modes", [(True, ("blocks", "masked")), (False, ("blocks", "masked", "causal"))])
def test_every_attention_choice_gives_the_same_losses(pipeline, packing, modes):
    work, overlay = pipeline
    runs = {
        m: train(
            work,
            overlay,
            f"attn-{m}-{packing}",
            "model.attention=" + m,
            "trainer.max_steps=2",
            f"model_alignment_strategy.sft.packing={str(packing).lower()}",
            *NO_GEN,
        )
        for m in modes
    }
    for mode in modes[1:]:
        assert losses(runs[mode]) == pytest.approx(losses(runs[modes[0]]), abs=1e-5), mode
        assert losses(runs[mode], "val_loss") == pytest.approx(losses(runs[modes[0]], "val_loss"), abs=1e-5), mode


def test_causal_attention_with_packing_is_refused(pipeline):
    work, overlay = pipeline
    with pytest.raises(Exception, match="packed documents attend to each other"):
        train(work, overlay, "causal-packed", "model.attention=causal")


def test_block_attention_cannot_be_compiled(pipeline):
    work, overlay = pipeline
    with pytest.raises(Exception, match="model.attention=blocks changes shapes"):
        train(work, overlay, "blocks-compiled", "model.attention=blocks", "trainer.compile=true")


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


def test_the_dry_run_plans_a_trn2_logical_core(train_mod, pipeline, monkeypatch):
    _, overlay = pipeline
    c = settings(train_mod, overlay, "trainer.accelerator=neuron")
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    assert train_mod.device_memory(c) == (24, "trn2 NeuronCore datasheet, per logical core at LNC 2")
    assert json.dumps(train_mod.NEURONCORE_TFLOPS["trn2"]) == "[166.75, 45.25]"  # 667 / 181 TFLOPS over 4 cores


def test_one_physical_core_per_process_halves_memory_and_peak(train_mod, pipeline, monkeypatch):
    """NEURON_LOGICAL_NC_CONFIG=1: each process has one of a trn2 chip's 8 NeuronCores, not 2 of them."""
    _, overlay = pipeline
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    c = settings(train_mod, overlay, "trainer.accelerator=neuron")
    assert train_mod.device_memory(c) == (12, "trn2 NeuronCore datasheet, per logical core at LNC 1")
    assert train_mod.neuron_datasheet("trn2") == (166.75 / 2, 45.25 / 2, 12)
    assert train_mod.neuron_datasheet("trn1") == (95, 23.75, 16)  # trn1 has no logical cores
