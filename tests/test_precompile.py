"""04_precompile.sh: what it runs on each kind of machine (the Neuron compiler itself exists only on Trainium)."""

import os
import stat

from conftest import run_stage

# Stands in for the Neuron SDK's neuron_parallel_compile, which only Trainium hosts have: it records the command
# it was given and prints the summary lines that the real tool prints after compiling.
FAKE_TOOL = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD"
echo "INFO ||PARALLEL_COMPILE||: Total graphs: 22"
echo "INFO ||PARALLEL_COMPILE||: Total successful compilations: $((22 - FAILED))"
echo "INFO ||PARALLEL_COMPILE||: Total failed compilations: $FAILED"
"""


def with_tool(tmp_path, failed):
    tool = tmp_path / "bin" / "neuron_parallel_compile"
    tool.parent.mkdir(exist_ok=True)
    tool.write_text(FAKE_TOOL)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{tool.parent}:{os.environ['PATH']}", RECORD=str(tmp_path / "argv"),
                FAILED=str(failed), NNODES="2", NODE_RANK="1", MASTER_ADDR="node0")


def test_on_trainium_the_training_launch_runs_under_neuron_parallel_compile(tmp_path):
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml", "seed=7"], env=with_tool(tmp_path, 0))
    argv = (tmp_path / "argv").read_text().splitlines()
    launch = argv[:argv.index("05_train.py")]
    assert launch[1:3] == ["-m", "torch.distributed.run"]
    assert " ".join(launch[3:]) == ("--nproc_per_node 32 --nnodes 2 --node_rank 1 --master_addr node0 "
                                    "--master_port 41000")
    args = argv[argv.index("05_train.py") + 1:]
    assert args[:3] == ["--config", "config.yaml", "seed=7"]
    assert "trainer.max_steps=10" in args and "trainer.accelerator=xla" in args
    assert "Total graphs: 22" in proc.stdout and "Total failed compilations: 0" in proc.stdout


def test_failed_graph_compilations_fail_the_stage(tmp_path):
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"], env=with_tool(tmp_path, 2), check=False)
    assert proc.returncode == 1 and "some graphs failed to compile" in proc.stderr


def test_without_xla_there_is_nothing_to_compile(tmp_path):
    proc = run_stage(["bash", "04_precompile.sh", "--config", "config.yaml"])
    assert proc.returncode == 0 and "nothing to" in proc.stdout
