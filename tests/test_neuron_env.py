"""The tutorial's Neuron compiler and runtime settings reach the environment before torch-xla starts."""

import os

import pytest

from conftest import load_stage

NEURON_VARS = ["NEURON_CC_FLAGS", "NEURON_COMPILE_CACHE_URL", "NEURON_FUSE_SOFTMAX", "BUCKET_CAP_MB",
               "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS", "NEURON_RT_EXEC_TIMEOUT", "XLA_USE_BF16"]


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
    assert os.environ["NEURON_CC_FLAGS"] == ("--model-type transformer --enable-mixed-precision-accumulation "
                                             "--auto-cast none")
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == os.path.expanduser("~/neuron_cache")
    assert os.environ["NEURON_FUSE_SOFTMAX"] == "1" and os.environ["BUCKET_CAP_MB"] == "1024"
    assert os.environ["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "5"
    assert os.environ["NEURON_RT_EXEC_TIMEOUT"] == "100" and os.environ["XLA_USE_BF16"] == "0"


def test_variables_already_set_win_and_compiler_flags_are_extended(clean_env):
    train = load_stage("05_train.py")
    clean_env.setenv("NEURON_COMPILE_CACHE_URL", "s3://bucket/cache")
    clean_env.setenv("NEURON_CC_FLAGS", "--retry_failed_compilation")
    train.neuron_environment(settings(train, "precision.type=fp32"))
    assert os.environ["NEURON_COMPILE_CACHE_URL"] == "s3://bucket/cache"
    assert os.environ["NEURON_CC_FLAGS"] == "--retry_failed_compilation --model-type transformer"
