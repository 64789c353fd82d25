"""The tutorial's Neuron compiler and runtime settings reach the environment before torch-xla starts."""

import os

import pytest
from conftest import load_stage, run_stage

NEURON_VARS = [
    "NEURON_CC_FLAGS",
    "NEURON_COMPILE_CACHE_URL",
    "NEURON_FUSE_SOFTMAX",
    "BUCKET_CAP_MB",
    "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS",
    "NEURON_RT_EXEC_TIMEOUT",
    "XLA_USE_BF16",
    "XLA_DISABLE_FUNCTIONALIZATION",
    "MALLOC_ARENA_MAX",
]


@pytest.fixture
def clean_env(monkeypatch):
    for key in NEURON_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def settings(train, *overrides):
    return train.resolve(train.load_config(["config.yaml"], list(overrides)), train.SCHEMA)


def test_config_yaml_sets_the_tutorial_neuron_environment(clean_env):
    train = load_stage("05_train.py")
    train.neuron_environment(settings(train))
    assert os.environ["NEURON_CC_FLAGS"] == (
        "--model-type transformer --enable-mixed-precision-accumulation --auto-cast none"
    )
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == os.path.expanduser("~/neuron_cache")
    assert os.environ["NEURON_FUSE_SOFTMAX"] == "1"
    assert os.environ["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "5"
    assert os.environ["NEURON_RT_EXEC_TIMEOUT"] == "100" and os.environ["XLA_USE_BF16"] == "0"


def test_knobs_that_would_do_nothing_are_not_set(clean_env):
    train = load_stage("05_train.py")
    train.neuron_environment(settings(train))
    assert "BUCKET_CAP_MB" not in os.environ  # DDP's bucket size: this loop has no DDP
    assert "MALLOC_ARENA_MAX" not in os.environ  # read by glibc at process start only: the launcher exports it


def test_variables_already_set_win_and_compiler_flags_are_extended(clean_env):
    train = load_stage("05_train.py")
    clean_env.setenv("NEURON_COMPILE_CACHE_URL", "s3://bucket/cache")
    clean_env.setenv("NEURON_CC_FLAGS", "--retry_failed_compilation")
    train.neuron_environment(settings(train, "precision.type=fp32"))
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == "s3://bucket/cache"
    assert os.environ["NEURON_CC_FLAGS"] == "--retry_failed_compilation --model-type transformer --auto-cast none"


def test_compiler_flags_already_exported_by_the_launcher_are_not_added_twice(clean_env):
    train = load_stage("05_train.py")
    clean_env.setenv("NEURON_CC_FLAGS", "--retry_failed_compilation --model-type transformer --auto-cast none")
    train.neuron_environment(settings(train, "precision.type=fp32"))
    assert os.environ["NEURON_CC_FLAGS"] == "--retry_failed_compilation --model-type transformer --auto-cast none"


def test_fp32_keeps_the_compilers_matrix_products_in_fp32(clean_env):
    """neuronx-cc casts fp32 matrix products to bf16 by default; precision.type=fp32 must mean fp32 on Trainium too."""
    train = load_stage("05_train.py")
    train.neuron_environment(settings(train, "precision.type=fp32"))
    assert os.environ["NEURON_CC_FLAGS"].split()[-2:] == ["--auto-cast", "none"]


def test_an_inherited_disable_functionalization_is_overridden(clean_env, capsys):
    train = load_stage("05_train.py")
    clean_env.setenv("XLA_DISABLE_FUNCTIONALIZATION", "1")
    train.neuron_environment(settings(train))
    assert os.environ["XLA_DISABLE_FUNCTIONALIZATION"] == "0"
    assert "overridden with 0" in capsys.readouterr().err


def test_neuron_env_prints_export_lines_for_the_launch(clean_env):
    proc = run_stage(
        [
            "05_train.py",
            "--config",
            "config.yaml",
            "--neuron-env",
            "xla.neuron.compiler_cache_url=s3://bucket/my cache",
        ],
        env=dict(os.environ),
    )
    lines = proc.stdout.splitlines()
    assert "export NEURON_COMPILE_CACHE_URL='s3://bucket/my cache'" in lines
    assert "export MALLOC_ARENA_MAX=128" in lines and "export XLA_DISABLE_FUNCTIONALIZATION=0" in lines
    assert all(line.startswith("export ") for line in lines)


EFA = ["FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE"]


def launch_env(**nodes):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in [*EFA, "NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "WORLD_SIZE", "LOCAL_WORLD_SIZE"]
    }
    return dict(env, **nodes)


@pytest.mark.parametrize("nodes", [{"NNODES": "2"}, {"SLURM_NNODES": "4"}], ids=["NNODES", "SLURM"])
def test_a_launch_over_several_nodes_exports_the_efa_variables(nodes):
    out = run_stage(["05_train.py", "--config", "config.yaml", "--neuron-env"], env=launch_env(**nodes)).stdout
    assert "export FI_PROVIDER=efa" in out and "export FI_EFA_USE_DEVICE_RDMA=1" in out
    assert "export FI_EFA_FORK_SAFE=1" in out


def test_one_node_needs_no_efa_variables():
    out = run_stage(["05_train.py", "--config", "config.yaml", "--neuron-env"], env=launch_env(NNODES="1")).stdout
    assert "FI_PROVIDER" not in out


@pytest.mark.parametrize("value,extracting", [("1", True), ("0", False), ("", False)])
def test_only_neuron_extract_graphs_only_1_means_graph_extraction(monkeypatch, value, extracting):
    monkeypatch.setenv("NEURON_EXTRACT_GRAPHS_ONLY", value)
    assert load_stage("05_train.py").extracting_graphs() is extracting


def test_requirements_neuron_pins_one_sdk_release():
    """SDK 2.29.1's manifest (aws-neuron-sdk src/helperscripts/n2-manifest.json), no package of another release."""
    from conftest import ROOT

    pins = dict(
        line.split("==")
        for line in (ROOT / "requirements-neuron.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins == {
        "torch-neuronx": "2.9.0.2.13.26312",
        "torch": "2.9.0",
        "torch-xla": "2.9.0",
        "libneuronxla": "2.2.16408.0",
        "neuronx-cc": "2.24.8799.0",
    }
