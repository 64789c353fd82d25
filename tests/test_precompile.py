"""04_precompile.sh: what it runs on each kind of machine (the Neuron compiler itself exists only on Trainium)."""

import os
import stat
import sys

from conftest import ROOT, run_stage

# Stands in for the Neuron SDK's neuron_parallel_compile, which only Trainium hosts have: it records the command
# it was given and the environment it was given it in, and prints the summary lines that the real tool prints
# after compiling.
FAKE_TOOL = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD"
printf '%s\\n' "NEURON_COMPILE_CACHE_URL=$NEURON_COMPILE_CACHE_URL" "MALLOC_ARENA_MAX=$MALLOC_ARENA_MAX" \\
  "NEURON_CC_FLAGS=$NEURON_CC_FLAGS" "FI_PROVIDER=$FI_PROVIDER" "FI_EFA_USE_DEVICE_RDMA=$FI_EFA_USE_DEVICE_RDMA" \\
  "FI_EFA_FORK_SAFE=$FI_EFA_FORK_SAFE" > "$RECORD.env"
if [ -n "$WARM" ]; then  # what parallel_compile logs, and all it does, when the cache holds every graph
  echo "INFO ||PARALLEL_COMPILE||: No todo hlos found in cache or hlo_tasklist," \
    "parallel_compile return before spawning workers...."
  exit 0
fi
echo "INFO ||PARALLEL_COMPILE||: Total graphs: $TOTAL"
echo "INFO ||PARALLEL_COMPILE||: Total successful compilations: $((TOTAL - FAILED))"
echo "INFO ||PARALLEL_COMPILE||: Total failed compilations: $FAILED"
"""

# Stands in for the Neuron virtual environment's interpreter, for 04's interpreter detection only: it answers
# "installed" when asked for torch-xla and runs everything else with the real interpreter.
FAKE_NEURON_PYTHON = f"""#!/usr/bin/env bash
if [ "$1" = "-c" ] && [[ "$2" == *torch_xla* ]]; then exit 0; fi
exec {sys.executable} "$@"
"""


def executable(path, text):
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def with_tool(tmp_path, failed=0, total=22, neuron_python=True, warm=False):
    executable(tmp_path / "bin" / "neuron_parallel_compile", FAKE_TOOL)
    if neuron_python:
        executable(tmp_path / "bin" / "python3", FAKE_NEURON_PYTHON)
    env = dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        RECORD=str(tmp_path / "argv"),
        FAILED=str(failed),
        TOTAL=str(total),
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="node0",
        WARM="1" if warm else "",
    )
    for key in (
        "PYTHON",
        "NEURON_COMPILE_CACHE_URL",
        "MALLOC_ARENA_MAX",
        "NEURON_CC_FLAGS",
        "FI_PROVIDER",
        "FI_EFA_USE_DEVICE_RDMA",
        "FI_EFA_FORK_SAFE",
        "SLURM_NNODES",
        "SLURM_JOB_NUM_NODES",
    ):
        env.pop(key, None)
    return env


def recorded(tmp_path):
    argv = (tmp_path / "argv").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (tmp_path / "argv.env").read_text().splitlines())
    return argv, env


def test_on_trainium_the_training_launch_runs_under_neuron_parallel_compile(tmp_path):
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml", "seed=7"], env=with_tool(tmp_path))
    argv, _ = recorded(tmp_path)
    stage = argv.index(str(ROOT / "05_train.py"))  # the 05 next to 04, whatever the caller's directory
    launch = argv[:stage]
    assert launch[1:3] == ["-m", "torch.distributed.run"]
    assert " ".join(launch[3:]) == (
        "--nproc_per_node 32 --nnodes 2 --node_rank 1 --master_addr node0 --master_port 41000"
    )
    args = argv[stage + 1 :]
    assert args[:3] == ["--config", "config.yaml", "seed=7"]
    assert "trainer.max_steps=10" in args and "trainer.accelerator=xla" in args
    assert "Total graphs: 22" in proc.stdout and "Total failed compilations: 0" in proc.stdout


def test_the_launch_uses_the_active_environment_that_has_torch_xla(tmp_path):
    run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path))
    argv, _ = recorded(tmp_path)
    assert argv[0] == str(tmp_path / "bin" / "python3")  # not .venv/bin/python, whose CPU torch has no torch-xla


def test_the_extraction_run_writes_no_run_checkpoints(tmp_path):
    run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path))
    argv, _ = recorded(tmp_path)
    assert "exp_manager.checkpoint_callback_params.every_n_train_steps=0" in argv


def test_the_compiler_and_the_launch_get_the_configured_cache(tmp_path):
    run_stage(
        ["bash", "04_precompile.sh", "--config", "config.yaml", f"xla.neuron.compiler_cache_url={tmp_path}/c"],
        env=with_tool(tmp_path),
    )
    _, env = recorded(tmp_path)
    assert env["NEURON_COMPILE_CACHE_URL"] == f"{tmp_path}/c"
    assert env["MALLOC_ARENA_MAX"] == "128"
    # The flags the workers will see are the ones the tool compiles with: 05 does not add them a second time.
    assert env["NEURON_CC_FLAGS"] == "--model-type transformer --enable-mixed-precision-accumulation --auto-cast none"


def test_a_warm_cache_succeeds_and_says_nothing_needed_compiling(tmp_path):
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path, warm=True))
    assert "nothing needed compiling" in proc.stdout and "Total graphs" not in proc.stdout


def test_a_launch_over_several_nodes_gets_the_efa_variables(tmp_path):
    run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path))  # NNODES=2
    _, env = recorded(tmp_path)
    assert (env["FI_PROVIDER"], env["FI_EFA_USE_DEVICE_RDMA"], env["FI_EFA_FORK_SAFE"]) == ("efa", "1", "1")


def test_failed_graph_compilations_fail_the_stage(tmp_path):
    proc = run_stage(
        ["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path, failed=2), check=False
    )
    assert proc.returncode == 1 and "some graphs failed to compile" in proc.stderr


def test_no_extracted_graph_fails_the_stage(tmp_path):
    proc = run_stage(
        ["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path, total=0), check=False
    )
    assert proc.returncode == 1 and "no graph was extracted" in proc.stderr


def test_trainium_without_a_torch_xla_interpreter_is_refused(tmp_path):
    proc = run_stage(
        ["bash", "04_precompile.sh", "--config", "config.yaml"],
        env=dict(with_tool(tmp_path, neuron_python=False), PYTHON=sys.executable),
        check=False,
    )
    assert proc.returncode == 1 and "has no torch-xla" in proc.stderr
    assert not (tmp_path / "argv").exists()


def test_without_xla_there_is_nothing_to_compile(tmp_path):
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"])
    assert proc.returncode == 0 and "nothing to" in proc.stdout


def test_config_paths_are_the_callers_as_for_the_python_stages(tmp_path):
    """From a project of the user's, --config my.yaml is the user's file (a typo in it is found), not the repository's
    config.yaml."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "my.yaml").write_text("trainer:\n  max_step: 3\n")
    command = ["bash", str(ROOT / "04_precompile.sh"), "--config", str(ROOT / "config.yaml"), "--config", "my.yaml"]
    proc = run_stage(command, cwd=project, check=False)
    assert proc.returncode == 1 and "my.yaml: unknown key 'trainer.max_step'" in proc.stderr


def test_04_copied_without_05_says_so_in_one_line(tmp_path):
    (tmp_path / "04_precompile.sh").write_text((ROOT / "04_precompile.sh").read_text())
    proc = run_stage(["bash", str(tmp_path / "04_precompile.sh"), "--config", "config.yaml"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "04 runs 05_train.py, which is not next to it" in proc.stderr
