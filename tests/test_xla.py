"""The XLA path (torch-xla on XLA's CPU device, as on Trainium but without one): static graphs, same numbers.

Run by `make test-xla` (and CI), which builds .venv-xla (torch 2.9.0 + torch-xla 2.9.0); skipped in `make test`.
The multi-rank layouts cannot run in one XLA process, so their graphs are traced and linted instead."""

import json
import os
import socket
import sys

import pytest
from conftest import run_stage

if os.environ.get("REQUIRE_XLA"):  # make test-xla: a missing torch-xla is a failure, not a skip
    import torch_xla  # noqa: F401
else:
    pytest.importorskip("torch_xla")
pytestmark = pytest.mark.xla

STEADY = [
    "trainer.max_steps=5",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=100",
    "model_alignment_strategy.peft.lora_dropout=0.0",
    "data.global_batch_size=4",
    "model.optim.lr=2e-3",
    "evaluation.generate.num_prompts=0",
    "model.optim.sched.warmup_steps=3",
]


def run(work, overlay, name, *overrides, env=None, check=True):
    env = dict(os.environ, PJRT_DEVICE="CPU", **(env or {}))
    proc = run_stage(
        [
            "05_train.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            f"exp_manager.explicit_log_dir={work / name}",
            f"xla.cache_dir={work / 'xla-cache'}",
            *STEADY,
            *overrides,
        ],
        env=env,
        check=check,
    )
    metrics = work / name / "metrics.jsonl"
    return proc, [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.fixture(scope="module")
def steady_xla(pipeline):
    """Five steady XLA steps (no checkpoint)."""
    work, overlay = pipeline
    return run(work, overlay, "xla", "trainer.accelerator=xla")


@pytest.fixture(scope="module")
def extraction_run(pipeline):
    """The same steps under graph extraction (NEURON_EXTRACT_GRAPHS_ONLY, as neuron_parallel_compile runs them),
    diverging (lr 1e12), with checkpoints asked for every 2 steps and nonfinite=stop."""
    work, overlay = pipeline
    return run(
        work,
        overlay,
        "xla-extract",
        "trainer.accelerator=xla",
        "model.optim.lr=1e12",
        "trainer.nonfinite=stop",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
        env=dict(NEURON_EXTRACT_GRAPHS_ONLY="1"),
    )


def test_five_xla_steps_compile_nothing_new_after_the_second_and_match_eager(pipeline, steady_xla):
    work, overlay = pipeline
    _, xla = steady_xla
    _, eager = run(work, overlay, "eager", "trainer.accelerator=cpu")
    steps = [r for r in xla if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    compiles = [r["xla_compiles"] for r in steps]
    assert compiles[1] > 0 and compiles[1:] == [compiles[1]] * 4, f"graphs compiled per step: {compiles}"
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in eager if "loss" in r], abs=1e-4)
    assert [r["val_loss"] for r in xla if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in eager if "val_loss" in r], abs=1e-4
    )


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


def test_checkpoints_on_xla_compile_once_and_resume_exactly(pipeline):
    work, overlay = pipeline
    # Dropout on: the resumed run must restore torch-xla's generator to draw the uninterrupted run's masks.
    fixed = [
        "trainer.accelerator=xla",
        "model.optim.sched.max_steps=5",
        "model_alignment_strategy.peft.lora_dropout=0.1",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
    ]
    _, whole = run(work, overlay, "xla-whole", *fixed)
    compiles = [r["xla_compiles"] for r in whole if "loss" in r]
    assert compiles[2:] == [compiles[2]] * 3, f"graphs compiled per step: {compiles}"  # first checkpoint: step 2
    run(work, overlay, "xla-resumed", *fixed, "trainer.max_steps=4")
    proc, resumed = run(work, overlay, "xla-resumed", *fixed)
    assert "resuming from" in proc.stdout
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in whole]


def steps(records):
    return [r for r in records if "loss" in r]


def test_no_graph_of_a_run_with_checkpoints_holds_float64_and_none_compiles_after_step_3(pipeline, tmp_path):
    """NeuronCores have no float64: every HLO module handed to the compiler, in a run with dropout, validation
    and checkpoints at steps 2, 4 and 6, must be free of it; the checkpoints' graphs compile once."""
    work, overlay = pipeline
    env_flags = f"--xla_dump_to={tmp_path / 'hlo'} --xla_dump_hlo_as_text"
    proc, records = run(
        work,
        overlay,
        "xla-f64",
        "trainer.accelerator=xla",
        "trainer.max_steps=6",
        "model_alignment_strategy.peft.lora_dropout=0.1",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
        env=dict(XLA_FLAGS=env_flags),
    )
    modules = sorted((tmp_path / "hlo").glob("*before_optimizations.txt"))
    assert len(modules) >= 5, "no HLO was dumped"
    with_f64 = [m.name for m in modules if "f64" in m.read_text()]
    assert not with_f64, f"float64 in {len(with_f64)} of {len(modules)} graphs: {with_f64}"
    assert sorted(p.name for p in (work / "xla-f64" / "checkpoints").iterdir()) == ["step_0000006"]
    compiles = [r["xla_compiles"] for r in steps(records)]
    assert compiles[2:] == [compiles[2]] * 4, f"graphs compiled per step: {compiles}"
    assert "ran these operations on the CPU" not in proc.stderr  # no CPU fallback (e.g. addmm with alpha)


def test_reading_the_step_flags_runs_no_graph_of_its_own(steady_xla, extraction_run):
    """The non-finite check reads a value the step's graph already computed: a normal step runs exactly as
    many graphs as a step in graph-extraction mode, where nothing is read."""
    (_, normal), (_, extracting) = steady_xla, extraction_run

    def per_step(records):
        runs = [r["xla_executions"] for r in steps(records)]
        return [b - a for a, b in zip(runs, runs[1:])]

    assert per_step(normal) == per_step(extracting)
    assert len(set(per_step(normal))) == 1, f"graph executions per step: {per_step(normal)}"


def test_graph_extraction_mode_takes_no_decision_from_device_values_and_writes_no_checkpoint(pipeline, extraction_run):
    """Under neuron_parallel_compile every graph returns zeros: a diverging loss must not stop the run (the
    real one decides), and no rank may write a checkpoint."""
    work, overlay = pipeline
    proc, records = extraction_run
    assert [r["step"] for r in steps(records)] == [1, 2, 3, 4, 5]
    assert not (work / "xla-extract" / "checkpoints").exists()
    assert "no run checkpoints are written" in proc.stdout
    # The same run for real stops at the first non-finite step.
    proc, _ = run(
        work,
        overlay,
        "xla-diverge",
        "trainer.accelerator=xla",
        "model.optim.lr=1e12",
        "trainer.nonfinite=stop",
        check=False,
    )
    assert proc.returncode == 1 and "is not finite" in proc.stderr


def test_seeds_reach_the_xla_generator(train_mod):
    """Dropout masks on XLA follow `seed`, and differ between data-parallel replicas (torch.manual_seed alone
    does not seed torch-xla's generator)."""
    import torch
    import torch_xla

    device = torch_xla.device()

    def draw(seed, dp_rank):
        par = train_mod.Parallel(
            train_mod.Layout(train_mod.Arch(vocab=1, hidden=1, inter=1, layers=1, heads=1, kv_heads=1, head_dim=1)),
            device,
            world=2,
            rank=dp_rank,
            connect=False,
        )
        train_mod.seed_dropout(seed, par, device)
        return torch.rand(64, device=device).cpu()

    assert torch.equal(draw(5, 0), draw(5, 0))
    assert not torch.equal(draw(5, 0), draw(6, 0))
    assert not torch.equal(draw(5, 0), draw(5, 1))


def traced_ranks():
    """The graphs of the four ranks of a TP 2 x DP 2 run, traced (not executed), one process per rank."""
    import subprocess

    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", XLA_ALWAYS_ALLREDUCE="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "xla_trace_rank.py", str(r)],
            cwd=os.path.dirname(__file__),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(4)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout))
    return out


@pytest.fixture(scope="module")
def rank_graphs():
    return traced_ranks()


def collectives(hlo):
    return [line.strip() for line in hlo.splitlines() if " all-reduce(" in line or " all-gather(" in line]


def test_every_rank_of_tp2_dp2_traces_the_same_graphs(rank_graphs):
    for kind in ("step", "export"):
        texts = [g[kind] for g in rank_graphs]
        assert all(t == texts[0] for t in texts), f"the {kind} graph differs between ranks"


def test_tp2_dp2_collectives_carry_the_right_groups_and_float_operands_only(rank_graphs):
    import re

    step, export = rank_graphs[0]["step"], rank_graphs[0]["export"]
    reduces, gathers = collectives(step), [c for c in collectives(export) if " all-gather(" in c]
    assert reduces and gathers
    groups = {re.search(r"replica_groups=(\{\{.*?\}\})", c).group(1) for c in reduces}
    # TP and DP groups; the K/V copies of this layout sit in the TP groups.
    assert groups == {"{{0,1},{2,3}}", "{{0,2},{1,3}}"}, groups
    for c in reduces + gathers:
        operands = re.findall(r"\b([a-z]+\d*)\[", c.split("=", 1)[1])
        assert set(operands) <= {"f32", "bf16"}, f"non-float operand in {c}"
    assert all("replica_groups={{0,1},{2,3}}" in g for g in gathers)
    assert "f64" not in step and "f64" not in export


def test_a_schedule_reaching_lr_0_and_a_partial_last_interval_compile_and_read_nothing_more(pipeline):
    """lr 0.0 and the last steps enter the update as device data, the losses as running device values: the graphs
    stay the same from step 3 to the end, and the host reads the device once per logged step only."""
    work, overlay = pipeline
    _, records = run(
        work,
        overlay,
        "xla-lr0",
        "trainer.accelerator=xla",
        "trainer.max_steps=7",
        "trainer.log_every_n_steps=3",
        "model.optim.sched.max_steps=4",
        "model.optim.sched.min_lr=0",
        "model.optim.sched.warmup_steps=1",
    )
    logged = steps(records)
    assert [r["step"] for r in logged] == [3, 6, 7] and [r["lr"] for r in logged][1:] == [0.0, 0.0]
    compiles = [r["xla_compiles"] for r in logged]
    assert compiles == [compiles[0]] * 3, f"graphs compiled at steps 3, 6, 7: {compiles}"
    reads = [r["xla_reads"] for r in logged]
    assert [b - a for a, b in zip(reads, reads[1:])] == [1, 1], f"device reads by step 3, 6, 7: {reads}"


def test_a_run_resumed_off_its_log_interval_compiles_nothing_after_its_second_step(pipeline):
    work, overlay = pipeline
    common = ["trainer.accelerator=xla", "model.optim.sched.max_steps=7"]
    run(
        work,
        overlay,
        "xla-offset",
        *common,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=2",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
    )  # logs steps 2 and 3, checkpoint at 3
    proc, records = run(
        work,
        overlay,
        "xla-offset",
        *common,
        "trainer.max_steps=7",
        "trainer.log_every_n_steps=1",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
    )
    assert "resuming from" in proc.stdout
    compiles = [r["xla_compiles"] for r in steps(records) if r["step"] > 3]
    assert len(compiles) == 4 and compiles[1:] == [compiles[1]] * 3, f"graphs compiled at steps 4-7: {compiles}"


def test_a_non_finite_step_stops_the_run_at_the_next_read_naming_its_step(pipeline):
    work, overlay = pipeline
    proc, records = run(
        work,
        overlay,
        "xla-late-stop",
        "trainer.accelerator=xla",
        "model.optim.lr=1e12",
        "trainer.nonfinite=stop",
        "trainer.log_every_n_steps=3",
        "trainer.gradient_clip_val=null",
        check=False,
    )
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert "is not finite (its update was not applied)" in message
    assert 1 <= int(message.split("step ")[1].split(":")[0]) <= 3
    assert not steps(records), "the read at step 3 stops the run before anything is logged"


def test_dora_rslora_loraplus_and_neftune_on_xla_hold_no_float64_and_compile_nothing_after_step_2(pipeline, tmp_path):
    """DoRA's weight norms, LoRA+'s second learning rate and NEFTune's noise (drawn in each step's graph) add no graph
    after the second step and no float64."""
    work, overlay = pipeline
    proc, records = run(
        work,
        overlay,
        "xla-variants",
        "trainer.accelerator=xla",
        "model_alignment_strategy.peft.use_dora=true",
        "model_alignment_strategy.peft.use_rslora=true",
        "model.optim.loraplus_lr_ratio=4",
        "model_alignment_strategy.sft.neftune_noise_alpha=5",
        env=dict(XLA_FLAGS=f"--xla_dump_to={tmp_path / 'hlo'} --xla_dump_hlo_as_text"),
    )
    modules = sorted((tmp_path / "hlo").glob("*before_optimizations.txt"))
    assert modules and not [m.name for m in modules if "f64" in m.read_text()]
    compiles = [r["xla_compiles"] for r in steps(records)]
    assert compiles[1:] == [compiles[1]] * 4, f"graphs compiled per step: {compiles}"
    assert "ran these operations on the CPU" not in proc.stderr


def test_the_smoke_run_on_xla_in_bf16_passes_compiling_nothing_anew_for_its_resume():
    """As trn1 trains (bf16 autocast): every figure within its tolerance of the CPU's fp32 run, the resumed run
    reusing every graph of the uninterrupted one, and no operator run on the CPU."""
    proc = run_stage(
        ["05_train.py", "--smoke", "trainer.accelerator=xla", "precision.type=autocast"],
        env=dict(os.environ, PJRT_DEVICE="CPU"),
    )
    checks = {
        line[:32].strip(): line.split()[-1] for line in proc.stdout.splitlines() if line.endswith((" ok", " FAIL"))
    }
    assert len(checks) == 20 and set(checks.values()) == {"ok"}, proc.stdout
    assert "resumed: graphs compiled anew" in checks and "operators run on the CPU" in checks
    assert "compilation, as torch-xla measured it" in proc.stdout


def test_the_self_check_finds_a_torch_xla_kernel_for_every_step_operator_and_names_one_without(train_mod):
    assert train_mod.fallback_ops("XLA") == []
    assert train_mod.fallback_ops("XLA", ["histc", "mm>mm.out"]) == ["histc"]  # histc: torch-xla's CPU fallback


def test_04_fills_the_xla_cache_and_a_run_and_its_resume_compile_no_graph_it_did_not(pipeline, tmp_path):
    """04 fills the persistent cache from a fresh run's steps, validations and export; the real run, stopped off its
    log interval after a mid-run validation and a checkpoint, and its resume with LoRA+ to the final evaluation and
    export, find every graph there and add none to the cache."""
    work, overlay = pipeline
    cache = tmp_path / "cache"
    same = [f"xla.cache_dir={cache}", "model.optim.loraplus_lr_ratio=4", "trainer.val_check_interval=2"]
    env = dict(os.environ, PJRT_DEVICE="CPU", NPROC_PER_NODE="1", PRECOMPILE_STEPS="4", PYTHON=sys.executable)
    with socket.socket() as s:  # a free port for the launch's rendezvous, not a fixed one
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = run_stage(
        ["bash", "04_precompile.sh", "--config", "config.yaml", "--config", str(overlay), *STEADY, *same], env=env
    )
    assert "fill the persistent XLA cache" in proc.stdout
    compiled_by_04 = sorted(p.name for p in cache.iterdir())
    assert int(proc.stdout.rsplit("graphs compiled:", 1)[1].split()[0]) > 0 and compiled_by_04
    common = ["trainer.accelerator=xla", "model.optim.sched.max_steps=5", "trainer.log_every_n_steps=2", *same]
    every = "exp_manager.checkpoint_callback_params.every_n_train_steps"
    _, first = run(work, overlay, "xla-graphs", *common, "trainer.max_steps=3", f"{every}=3")
    proc, resumed = run(work, overlay, "xla-graphs", *common, "trainer.max_steps=5", f"{every}=0")
    assert "resuming from" in proc.stdout and any("val_loss" in r for r in first)
    assert sorted(p.name for p in cache.iterdir()) == compiled_by_04  # no graph compiled that 04 had not
    # xla_compiles counts each graph a process compiles or loads from the cache: the fresh run loads 04's graphs,
    # every one of them once; the resumed run a part of them, nothing more.
    assert first[-1]["xla_compiles"] == len(compiled_by_04) >= resumed[-1]["xla_compiles"]


def test_dora_under_autocast_on_xla_gives_every_lora_weight_its_gradient(train_mod):
    """torch 2.9's autocast caches the bf16 cast of a weight even when made without a gradient (DoRA's norm), and
    the forward pass then reused it: B trained nothing. (torch 2.13 does not; the smoke run on XLA found it.)"""
    import torch
    import torch_xla

    torch.manual_seed(0)
    with torch.device(torch_xla.device()):
        layer = train_mod.LoRALinear((16, 32), torch.bfloat16)
        x = torch.randn(8, 32)
    layer.init_lora(4, 8.0, 0.0, dora=True)
    with torch.autocast("xla", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert all(p.grad is not None for p in train_mod.lora_parameters(layer))
