"""05 survives interruption: atomic step checkpoints, exact resume after SIGKILL, SIGTERM, non-finite steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_stage, train

RUN = [
    "trainer.max_steps=10",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=4",
    "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
    "exp_manager.checkpoint_callback_params.save_top_k=2",
    "data.global_batch_size=8",
    "evaluation.generate.num_prompts=0",
    "exp_manager.create_tensorboard_logger=false",
]  # dropout stays 0.05


def command(work, overlay, name, nproc, overrides):
    args = [
        "05_train.py",
        "--config",
        "config.yaml",
        "--config",
        str(overlay),
        f"exp_manager.explicit_log_dir={work / name}",
        *RUN,
        *overrides,
    ]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run_to_end(work, overlay, name, nproc=1, *overrides):
    proc = subprocess.run(
        command(work, overlay, name, nproc, overrides),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def start(work, overlay, name, nproc=1, *overrides):
    return subprocess.Popen(
        command(work, overlay, name, nproc, overrides),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_until_step(proc, run_dir, step):
    """Block until the run has logged `step` and holds a complete checkpoint."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.stderr.read()[-3000:]}"
        try:
            logged = [r["step"] for r in records(run_dir) if "loss" in r]
        except (FileNotFoundError, json.JSONDecodeError):
            logged = []
        if logged and logged[-1] >= step and any(p.suffix != ".tmp" for p in (run_dir / "checkpoints").glob("step_*")):
            return
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached")


def kill_run(proc, run_dir):
    """SIGKILL the launcher and every process of this run (torchrun starts its workers in their own sessions);
    returns how many processes running the training script were killed."""
    os.killpg(proc.pid, signal.SIGKILL)
    killed = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes()
            if f"explicit_log_dir={run_dir}\0".encode() in args and b"torch.distributed.run" not in args:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):
            pass  # the process ended meanwhile
    proc.wait()
    return killed


def same_run(resumed, reference):
    """Every record's loss / val_loss (bit-exact) and step, in order, with nothing repeated or missing."""
    keys = ("step", "loss", "val_loss", "grad_norm", "lr", "consumed_samples")
    pick = [[(k, r[k]) for k in keys if k in r] for r in records(resumed)]
    assert pick == [[(k, r[k]) for k in keys if k in r] for r in records(reference)]


@pytest.fixture(scope="module")
def references(pipeline):
    work, overlay = pipeline
    for packing in (True, False):
        run_to_end(work, overlay, f"ref-packing-{packing}", 1, f"model_alignment_strategy.sft.packing={packing}")
    run_to_end(work, overlay, "ref-dp2", 2)
    return work, overlay


@pytest.mark.parametrize("nproc,packing", [(1, True), (1, False), (2, True)], ids=["packed", "unpacked", "dp2"])
def test_a_run_killed_after_a_checkpoint_resumes_to_exactly_the_uninterrupted_losses(references, nproc, packing):
    work, overlay = references
    name = f"killed-{nproc}-{packing}"
    kill_at = random.Random(f"{nproc}{packing}").randint(3, 7)
    proc = start(work, overlay, name, nproc, f"model_alignment_strategy.sft.packing={packing}")
    wait_until_step(proc, work / name, kill_at)
    killed = kill_run(proc, work / name)
    assert nproc == 1 or killed == nproc, f"{killed} of {nproc} workers found to kill"
    assert not (work / name / "final").exists(), "the run finished before it could be killed"
    resumed = run_to_end(work, overlay, name, nproc, f"model_alignment_strategy.sft.packing={packing}")
    assert "resuming from" in resumed.stdout
    same_run(work / name, work / ("ref-dp2" if nproc == 2 else f"ref-packing-{packing}"))


VARIANTS = [
    "model_alignment_strategy.peft.use_dora=true",
    "model_alignment_strategy.peft.use_rslora=true",
    "model.optim.loraplus_lr_ratio=4",
    "model_alignment_strategy.sft.neftune_noise_alpha=5",
]


def killed_and_resumed(work, overlay, name, *overrides):
    """A run with these overrides killed after a random step in 3..7 and resumed to its end, against the same run
    uninterrupted (ref-<name>); returns the uninterrupted run's output."""
    reference = run_to_end(work, overlay, f"ref-{name}", 1, *overrides)
    proc = start(work, overlay, f"killed-{name}", 1, *overrides)
    wait_until_step(proc, work / f"killed-{name}", random.Random(name).randint(3, 7))
    kill_run(proc, work / f"killed-{name}")
    assert not (work / f"killed-{name}" / "final").exists(), "the run finished before it could be killed"
    assert "resuming from" in run_to_end(work, overlay, f"killed-{name}", 1, *overrides).stdout
    same_run(work / f"killed-{name}", work / f"ref-{name}")
    return reference


def test_a_run_with_dora_rslora_loraplus_and_neftune_resumes_exactly(references):
    """DoRA's magnitudes, the noise NEFTune draws and the learning rates of LoRA+'s two groups are part of the
    resumed state."""
    work, overlay = references
    killed_and_resumed(work, overlay, "variants", *VARIANTS)
    assert records(work / "ref-variants")[1]["loss"] != records(work / "ref-packing-True")[1]["loss"]


def test_a_mixture_of_training_sources_resumes_exactly_and_logs_each_source_s_share(references):
    work, overlay = references
    sources = [work / "data" / "training.jsonl", work / "data" / "validation.jsonl"]
    mix = [f"data.train_dir=[{sources[0]}, {sources[1]}]", "data.mix=[1, 3]"]
    assert "train mix:" in killed_and_resumed(work, overlay, "mix", *mix).stdout
    shares = records(work / "ref-mix")[0]["data_mix"]
    assert [round(shares[str(p)]["share"], 1) for p in sources] == [0.2, 0.8]  # 1:3 of whole windows


def test_an_incomplete_or_corrupt_checkpoint_is_skipped_with_a_warning_naming_it(references):
    work, overlay = references
    proc = start(work, overlay, "corrupt")
    wait_until_step(proc, work / "corrupt", 7)
    kill_run(proc, work / "corrupt")
    complete = sorted(p for p in (work / "corrupt" / "checkpoints").glob("step_*") if p.suffix != ".tmp")
    assert len(complete) == 2
    newest = complete[-1]
    (newest / "rank_00000.pt").write_bytes((newest / "rank_00000.pt").read_bytes()[:-10])
    (work / "corrupt" / "checkpoints" / "step_9999999.tmp").mkdir()
    resumed = run_to_end(work, overlay, "corrupt")
    assert f"skipping checkpoint {work / 'corrupt' / 'checkpoints' / 'step_9999999.tmp'}" in resumed.stderr
    assert f"skipping checkpoint {newest}: rank_00000.pt has" in resumed.stderr
    assert f"resuming from {complete[0]}" in resumed.stdout
    same_run(work / "corrupt", work / "ref-packing-True")


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_0(references):
    work, overlay = references
    proc = start(work, overlay, "term")
    wait_until_step(proc, work / "term", 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert (work / "term" / "checkpoints" / f"step_{stopped:07d}" / "trainer_state.json").exists()
    run_to_end(work, overlay, "term")
    same_run(work / "term", work / "ref-packing-True")


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_0_like_sigterm(references):
    work, overlay = references
    proc = start(work, overlay, "sigint")
    wait_until_step(proc, work / "sigint", 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    stopped = int(out.split("stopped by SIGINT after step ")[1].split(";")[0])
    assert (work / "sigint" / "checkpoints" / f"step_{stopped:07d}" / "trainer_state.json").exists()
    run_to_end(work, overlay, "sigint")
    same_run(work / "sigint", work / "ref-packing-True")


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(train_mod):
    """SystemExit with a message: Python prints the line, no traceback, exit status 1."""
    before = signal.getsignal(signal.SIGINT)
    with train_mod.stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop == [signal.SIGINT]
        with pytest.raises(SystemExit, match="^stopped by a second Ctrl-C, without a checkpoint of this step$"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_to_torchrun_stops_every_worker_after_the_same_step_with_a_checkpoint(references):
    """torchrun passes SIGTERM on to every worker and gives them --shutdown-timeout seconds (30 by default) before
    SIGKILL; the workers agree on the step to stop after, write one checkpoint and exit 0; torchrun itself then
    reports the signal (exit status 1). A relaunch continues exactly."""
    work, overlay = references
    proc = start(work, overlay, "term-dp2", 2)
    wait_until_step(proc, work / "term-dp2", 3)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as a scheduler's preemption reaches it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "SIGTERM" in err, err[-3000:]
    stopped = int(out.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert (work / "term-dp2" / "checkpoints" / f"step_{stopped:07d}" / "trainer_state.json").exists()
    assert "exitcode  : -9" not in err, "a worker was killed before it finished"
    run_to_end(work, overlay, "term-dp2", 2)
    same_run(work / "term-dp2", work / "ref-dp2")


def test_an_in_process_run_gives_the_sigterm_handler_back(pipeline):
    work, overlay = pipeline
    before = signal.getsignal(signal.SIGTERM)
    train(work, overlay, "handler", "trainer.max_steps=1", "evaluation.generate.num_prompts=0")
    assert signal.getsignal(signal.SIGTERM) is before


def test_rotation_and_resume_touch_only_this_run_s_checkpoints_never_copies_of_yours(pipeline):
    """step_<digits> directories with their trainer_state.json are the run's; a copy named otherwise, a directory
    named step_best, a file of notes: rotation keeps them and a resume steps around them."""
    work, overlay = pipeline
    every = ["exp_manager.checkpoint_callback_params.every_n_train_steps=1", "evaluation.generate.num_prompts=0"]
    train(work, overlay, "own", "trainer.max_steps=2", "model.optim.sched.max_steps=4", *every)
    checkpoints = work / "own" / "checkpoints"
    shutil.copytree(checkpoints / "step_0000002", checkpoints / "step_0000002_best")
    (checkpoints / "step_best").mkdir()
    (checkpoints / "notes.txt").write_text("the best one so far\n")
    records = train(work, overlay, "own", "trainer.max_steps=4", "model.optim.sched.max_steps=4", *every)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "notes.txt",
        "step_0000002_best",
        "step_0000004",
        "step_best",
    ]


def test_a_checkpoint_holds_the_adapter_optimizer_and_rng_but_no_base_weights(references):
    from safetensors.torch import load_file

    work, _ = references
    ckpt = sorted((work / "ref-packing-True" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpt] == ["step_0000008", "step_0000010"]  # the last 2 of 5
    state = json.loads((ckpt[-1] / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["consumed_samples"] == 80 and state["data"]["next_step"] == 10
    assert set(state["files"]) == {"rank_00000.pt", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    own = torch.load(ckpt[-1] / "rank_00000.pt", weights_only=True)
    assert set(own) == {"lora", "optimizer", "rng"} and set(own["rng"]) >= {"python", "numpy", "torch"}
    lora = sum(t.numel() for t in own["lora"])
    assert lora == 23_552  # 2 layers x the four targets' A and B at rank 16
    assert all(
        t.numel() == own["lora"][i].numel()
        for i, s in own["optimizer"]["state"].items()
        for t in (s["exp_avg"], s["exp_avg_sq"])
    )
    adapter = load_file(str(ckpt[-1] / "adapter" / "adapter_model.safetensors"))
    assert all(16 in t.shape for t in adapter.values()), "only rank-16 LoRA factors, no base weight"


def test_resuming_with_another_layout_is_refused(references):
    work, overlay = references
    shutil.copytree(work / "ref-dp2", work / "dp2-unfinished")
    shutil.rmtree(work / "dp2-unfinished" / "final")
    proc = subprocess.run(command(work, overlay, "dp2-unfinished", 1, []), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "was written by TP 1 x DP 2; resume with the same layout" in proc.stderr


def test_a_non_finite_step_stops_the_run_naming_the_step_and_the_last_checkpoint(pipeline):
    work, overlay = pipeline
    proc = run_stage(
        [
            "05_train.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            *RUN,
            f"exp_manager.explicit_log_dir={work / 'nan-stop'}",
            "model.optim.lr=1e12",
            "trainer.gradient_clip_val=null",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
        ],
        check=False,
    )
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    step = int(message.split("step ")[1].split(":")[0])
    assert step >= 2 and "is not finite" in message
    assert f"last good checkpoint: {work / 'nan-stop' / 'checkpoints' / f'step_{step - 1:07d}'}" in message


def test_non_finite_steps_can_be_skipped_and_counted(pipeline):
    from safetensors.torch import load_file

    work, overlay = pipeline
    run_stage(
        [
            "05_train.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            *RUN,
            f"exp_manager.explicit_log_dir={work / 'nan-skip'}",
            "model.optim.lr=1e12",
            "trainer.gradient_clip_val=null",
            "trainer.nonfinite=skip",
        ]
    )
    steps = [r for r in records(work / "nan-skip") if "skipped_steps" in r]
    assert steps[-1]["skipped_steps"] >= 1 and steps[0]["skipped_steps"] == 0
    assert any(r["loss"] is None for r in steps)
    adapter = load_file(str(work / "nan-skip" / "final" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values()), "a skipped step must not reach the weights"


def test_a_finished_run_is_not_run_again(references):
    work, overlay = references
    proc = subprocess.run(command(work, overlay, "ref-packing-True", 1, []), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "holds a finished run (final/adapter)" in proc.stderr


def test_raising_max_steps_trains_a_finished_run_on(references):
    work, overlay = references
    shutil.copytree(work / "ref-packing-True", work / "longer")
    proc = run_to_end(work, overlay, "longer", 1, "trainer.max_steps=12", "model.optim.sched.max_steps=10")
    assert f"resuming from {work / 'longer' / 'checkpoints' / 'step_0000010'}" in proc.stdout
    steps = [r["step"] for r in records(work / "longer") if "loss" in r]
    assert steps == list(range(1, 13))


def test_a_resume_that_changes_what_is_trained_is_refused_listing_each_change(references):
    work, overlay = references
    shutil.copytree(work / "ref-packing-True", work / "changed")
    before = {p: p.read_bytes() for p in (work / "changed").rglob("*") if p.is_file()}
    proc = subprocess.run(
        command(
            work,
            overlay,
            "changed",
            1,
            [
                "trainer.max_steps=12",
                "data.seq_length=128",
                "model.optim.lr=0.05",
                "model_alignment_strategy.peft.lora_rank=8",
            ],
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    for change in (
        "data.seq_length: 64 -> 128",
        "model.optim.lr: 0.01 -> 0.05",
        "model_alignment_strategy.peft.lora_rank: 16 -> 8",
    ):
        assert change in message
    assert "trainer.max_steps" not in message  # resumable
    assert {p: p.read_bytes() for p in (work / "changed").rglob("*") if p.is_file()} == before


def test_a_resume_on_changed_data_content_is_refused(pipeline):
    work, overlay = pipeline
    data = work / "own-data" / "training.jsonl"
    data.parent.mkdir()
    shutil.copy(work / "data" / "training.jsonl", data)
    short = [
        f"data.train_dir={data}",
        "trainer.max_steps=2",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
    ]
    run_to_end(work, overlay, "own-data-run", 1, *short)
    with open(data, "a") as f:  # the same file name, other records
        f.write(data.read_text().splitlines(keepends=True)[0])
    proc = subprocess.run(
        command(work, overlay, "own-data-run", 1, [*short, "trainer.max_steps=4"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "content of data.train_dir: sha256" in proc.stderr.strip().splitlines()[-1]


def test_a_resume_records_what_it_changed_and_keeps_the_original_config(references):
    work, overlay = references
    shutil.copytree(work / "ref-packing-True", work / "relogged")
    original = (work / "relogged" / "config.yaml").read_text()
    run_to_end(
        work,
        overlay,
        "relogged",
        1,
        "trainer.max_steps=12",
        "model.optim.sched.max_steps=10",
        "trainer.log_every_n_steps=2",
    )
    assert (work / "relogged" / "config.yaml").read_text() == original
    (resume,) = [json.loads(line) for line in (work / "relogged" / "resumes.jsonl").read_text().splitlines()]
    assert resume["step"] == 10 and resume["checkpoint"] == "step_0000010"
    assert resume["changed"] == {
        "trainer.max_steps": [10, 12],
        "trainer.log_every_n_steps": [1, 2],
        "exp_manager.explicit_log_dir": [str(work / "ref-packing-True"), str(work / "relogged")],
    }
