"""`05_train.py --smoke`: the device path of a run on a tiny random model against the same run on the CPU in fp32.

Here the device is the CPU (and, in tests/test_xla.py, XLA's CPU device), so the smoke run is checked for what it
runs and reports: every row passes where nothing is wrong, a wrong number fails its row and the launch, and it needs
no config file or data."""

import os
import re

import pytest
from conftest import ROOT, run_stage


def rows(stdout):
    """{check: "ok" or "FAIL"} from the smoke run's table."""
    return {line[:32].strip(): line.split()[-1] for line in stdout.splitlines() if line.endswith((" ok", " FAIL"))}


def test_a_smoke_run_needs_no_config_file_and_passes_every_check_here_bf16_within_its_own_tolerance(tmp_path):
    proc = run_stage([str(ROOT / "05_train.py"), "--smoke", "precision.type=autocast"], cwd=tmp_path)
    checks = rows(proc.stdout)
    assert checks and set(checks.values()) == {"ok"}, proc.stdout
    for check in (
        "loss, step 1",
        "grad_norm, step 4",
        "val_loss, step 0",
        "adapter, 42 tensors",
        "resumed: loss, step 3",
    ):
        assert check in checks
    loss = re.search(r"^loss, step 1 .* (\S+) +(\S+)  ok$", proc.stdout, re.M)
    assert float(loss[1]) > 0 and float(loss[2]) == 5e-3  # bf16 differs from fp32, within autocast's tolerance
    assert "its first step, which compiles what it runs" in proc.stdout and "smoke run: 18 of 18 checks" in proc.stdout
    assert not list(tmp_path.iterdir())  # nothing written where it was started
    scratch = re.search(r"log: (\S+)/smoke.log", proc.stdout)[1]
    assert not os.path.exists(scratch)  # its runs are removed when every check passes


def test_under_torchrun_the_smoke_run_takes_tensor_and_data_parallel_from_the_world_size(tmp_path):
    proc = run_stage(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(ROOT / "05_train.py"), "--smoke"],
        cwd=tmp_path,
    )
    assert "TP 2 x DP 2" in proc.stdout and "4 Q / 1 KV heads" in proc.stdout
    checks = rows(proc.stdout)
    assert len(checks) == 18 and set(checks.values()) == {"ok"}, proc.stdout


def test_a_number_off_on_the_device_fails_its_rows_and_the_launch_and_keeps_the_runs(train_mod, monkeypatch, capsys):
    """A deliberate 1% error in the loss of bf16 runs only (the device's precision here, never the fp32 reference)."""
    loss_sum = train_mod.loss_sum
    monkeypatch.setattr(
        train_mod,
        "loss_sum",
        lambda model, mb, device, autocast: loss_sum(model, mb, device, autocast) * (1.01 if autocast else 1),
    )
    with pytest.raises(train_mod.StageError, match=r"smoke run: \d+ check\(s\) failed"):
        train_mod.main(["--smoke", "precision.type=autocast"])
    out = capsys.readouterr().out
    checks = rows(out)
    assert checks["loss, step 1"] == "FAIL" and checks["val_loss, step 0"] == "FAIL"
    assert checks["resumed: loss, step 3"] == "ok"  # the resumed run repeats the device's own numbers
    kept = re.search(r"smoke run: (\S+) keeps the runs", out)[1]
    assert os.path.exists(os.path.join(kept, "smoke.log"))


def test_a_smoke_run_takes_overrides_but_no_config_file_and_names_a_typo(tmp_path):
    proc = run_stage([str(ROOT / "05_train.py"), "--smoke", "--config", "config.yaml"], cwd=ROOT, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "overrides only" in proc.stderr
    proc = run_stage([str(ROOT / "05_train.py"), "--smoke", "precision.typ=autocast"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "unknown key 'precision.typ'; did you mean 'precision.type'?" in proc.stderr
