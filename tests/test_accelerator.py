"""Device selection, the start-up self-check and compiled layers.

Only the detection of Neuron hosts is faked (a device directory with a `neuron0` file); everything that trains
runs for real on this CPU."""

import pytest
import torch
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


# What a device must implement and what every device has: allocation, strided views, a read to the host.
EVERY_DEVICE = {"empty.memory_format", "empty_strided", "as_strided", "_local_scalar_dense"}


def test_step_ops_is_what_a_traced_step_needs_of_a_device_that_registers_nothing(train_mod):
    """Regenerated from real steps (TP 1 in fp32 and autocast here, TP 2 under torchrun): the operators that a
    PrivateUse1 device with no kernels of its own would leave to its fallback are exactly 05's STEP_OPS."""
    import json
    import textwrap

    import step_ops
    from conftest import load_stage

    chains = step_ops.traced_step_ops(load_stage("05_train.py"), "fp32")
    chains |= step_ops.traced_step_ops(load_stage("05_train.py"), "autocast")
    proc = run_stage(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tests/step_ops.py", "autocast"]
    )
    chains |= set(json.loads(proc.stdout.splitlines()[-1]))
    short = [">".join(op.removeprefix("aten::") for op in chain.split(" > ")) for chain in chains]
    needed = sorted(e for e in train_mod.fallback_ops("PrivateUse1", short) if e.split(">")[-1] not in EVERY_DEVICE)
    regenerated = "\n".join(textwrap.wrap(" ".join(needed), 116))
    assert needed == train_mod.STEP_OPS, f"05's STEP_OPS is stale; the traced step needs:\n{regenerated}"


SELF_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
from conftest import load_stage
train = load_stage("05_train.py")
torch.library.Library("_", "IMPL").fallback(lambda *a, **k: None, dispatch_key="PrivateUse1")  # a CPU fallback
kernels = torch.library.Library("aten", "IMPL")
for name in sys.argv[1:]:
    kernels.impl(name, lambda *a, **k: None, "PrivateUse1")
print(train.fallback_ops("PrivateUse1", ["mm>mm.out", "mul.Tensor>mul.out", "bmm>bmm.out", "view", "where.self"]))
device = torch.device(torch._C._get_privateuse1_backend_name())
arch = train.Arch(vocab=1, hidden=1, inter=1, layers=1, heads=1, kv_heads=1, head_dim=1)
try:
    train.self_check(device, train.Parallel(train.Layout(arch), device, world=1))
except train.StageError as e:
    print(f"error: {e}")
"""


def test_the_self_check_names_the_operators_a_device_would_run_on_the_cpu_and_the_sdk_found():
    """A PrivateUse1 backend made here (a CPU fallback and kernels for mm, mul.out and view): mm's own kernel and the
    out= form that mul's generic kernel calls count; bmm and where fall back. (In a fresh process: a registration
    cannot be undone.)"""
    proc = run_stage(["-c", SELF_CHECK, "mm", "mul.out", "view"])
    found, error = proc.stdout.strip().splitlines()[-2:]
    assert found == "['bmm>bmm.out', 'where.self']"
    assert error.startswith("error: device self-check on privateuseone: operators of the step without a PrivateUse1")
    assert "bmm>bmm.out" in error and "mm>mm.out" not in error and error.endswith(f"found torch {torch.__version__}")


def test_a_backend_without_operator_kernels_is_left_to_its_runtime_count_and_the_next_probe_runs():
    proc = run_stage(["-c", SELF_CHECK])
    assert "registers no kernel per operator" in proc.stdout
    assert "error: device self-check on privateuseone: RNG state get/set:" in proc.stdout
