"""Tensor and data parallel training under torchrun (gloo, CPU) gives the single-process run's numbers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, head, hf_masked_loss, load_stage, run_stage, train
from safetensors.torch import load_file

# Dropout off (its masks depend on how tensors are split). A small learning rate: near a zero gradient AdamW's
# update g / (|g| + eps) turns the last-bit differences of a reordered sum into lr / eps times as much.
EXACT = [
    "model_alignment_strategy.peft.lora_dropout=0.0",
    "data.global_batch_size=4",
    "trainer.max_steps=3",
    "model.optim.lr=2e-3",
    "model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
]


@pytest.fixture(scope="module")
def shards(pipeline):
    """The tiny model converted for TP 2 and for TP 4 with each KV head copied twice (trn1 layout)."""
    work, overlay = pipeline
    for tp, kv in ((2, 1), (4, 2)):
        run_stage(
            [
                "03_convert_checkpoint.py",
                "--config",
                "config.yaml",
                "--config",
                str(overlay),
                f"exp_manager.resume_from_checkpoint={work / f'ckpt-tp{tp}'}",
                f"distributed_strategy.tensor_model_parallel_size={tp}",
                f"distributed_strategy.kv_replicator={kv}",
            ]
        )
    return work, overlay


@pytest.fixture(scope="module")
def reference(shards):
    work, overlay = shards
    return run_metrics(train(work, overlay, "single", *EXACT)), adapter(work / "single")


def torchrun(work, overlay, name, nproc, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "05_train.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            f"exp_manager.explicit_log_dir={work / name}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_metrics(records):
    return {
        "loss": [r["loss"] for r in records if "loss" in r],
        "val": [r["val_loss"] for r in records if "val_loss" in r],
        "grad_norm": [r["grad_norm"] for r in records if "grad_norm" in r],
    }


def adapter(run_dir):
    return load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))


def read_metrics(run_dir):
    return run_metrics([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()])


LAUNCHES = {
    "tp2": (
        2,
        ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.kv_replicator=1"],
        "ckpt-tp2",
    ),
    "tp4-kv2": (
        4,
        ["distributed_strategy.tensor_model_parallel_size=4", "distributed_strategy.kv_replicator=2"],
        "ckpt-tp4",
    ),
    "dp2": (2, [], "ckpt"),
    "tp2xdp2": (
        4,
        ["distributed_strategy.tensor_model_parallel_size=2", "distributed_strategy.kv_replicator=1"],
        "ckpt-tp2",
    ),
    "tp2-activation-checkpointing": (
        2,
        [
            "distributed_strategy.tensor_model_parallel_size=2",
            "distributed_strategy.kv_replicator=1",
            "model.activations_checkpoint=true",
        ],
        "ckpt-tp2",
    ),
}


@pytest.mark.parametrize("launch", LAUNCHES)
def test_parallel_run_equals_the_single_process_run(shards, reference, launch):
    work, overlay = shards
    nproc, overrides, ckpt = LAUNCHES[launch]
    torchrun(work, overlay, launch, nproc, *EXACT, *overrides, f"exp_manager.resume_from_checkpoint={work / ckpt}")
    want, want_adapter = reference
    got = read_metrics(work / launch)
    assert len(got["loss"]) == 3 and len(got["val"]) == 3
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert want["loss"][0] != pytest.approx(want["loss"][2], abs=1e-3), "training must move the loss"
    got_adapter = adapter(work / launch)
    assert got_adapter.keys() == want_adapter.keys()
    for name, tensor in want_adapter.items():
        assert torch.allclose(got_adapter[name], tensor, atol=1e-5, rtol=0), name
    assert any(t.abs().max() > 1e-3 for n, t in want_adapter.items() if "lora_B" in n), "B must have trained"


@pytest.mark.parametrize("launch", ["dp2", "tp2xdp2"])
def test_a_gradient_clip_that_acts_gives_the_single_process_numbers_under_tp_and_dp(shards, reference, launch):
    """The clip scales by the norm of the whole gradient, reduced over every rank first: a clip below every step's
    norm changes the training, and DP 2 and TP 2 x DP 2 still give the single process's losses and adapter."""
    work, overlay = shards
    clip = f"trainer.gradient_clip_val={min(reference[0]['grad_norm']) / 4}"
    if not (work / "single-clip" / "final").exists():
        train(work, overlay, "single-clip", *EXACT, clip)
    want = read_metrics(work / "single-clip")
    assert want["loss"][2] != pytest.approx(reference[0]["loss"][2], abs=1e-4), "the clip must act"
    nproc, overrides, ckpt = LAUNCHES[launch]
    name = f"clip-{launch}"
    torchrun(work, overlay, name, nproc, *EXACT, clip, *overrides, f"exp_manager.resume_from_checkpoint={work / ckpt}")
    got = read_metrics(work / name)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    for tensor_name, tensor in adapter(work / "single-clip").items():
        assert torch.allclose(adapter(work / name)[tensor_name], tensor, atol=1e-5, rtol=0), tensor_name


@pytest.fixture(scope="module")
def dora_reference(shards):
    work, overlay = shards
    return run_metrics(train(work, overlay, "single-dora", *EXACT, DORA)), adapter(work / "single-dora")


DORA = "model_alignment_strategy.peft.use_dora=true"


@pytest.mark.parametrize("launch", ["tp2", "tp4-kv2", "tp2-activation-checkpointing"])
def test_dora_under_tensor_parallelism_equals_the_single_process_run_and_loads_in_peft(shards, dora_reference, launch):
    """A row-parallel layer's weight norm spans its ranks, and copies of a KV head sum their magnitude gradients:
    the numbers and the adapter are the single process's, and peft computes the val_loss 05 reports with it."""
    work, overlay = shards
    nproc, overrides, ckpt = LAUNCHES[launch]
    name = f"dora-{launch}"
    torchrun(work, overlay, name, nproc, *EXACT, DORA, *overrides, f"exp_manager.resume_from_checkpoint={work / ckpt}")
    want, want_adapter = dora_reference
    got = read_metrics(work / name)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    got_adapter = adapter(work / name)
    assert got_adapter.keys() == want_adapter.keys()
    assert any("lora_magnitude_vector" in n for n in got_adapter)
    for tensor_name, tensor in want_adapter.items():
        assert torch.allclose(got_adapter[tensor_name], tensor, atol=1e-5, rtol=0), tensor_name
    theirs = hf_masked_loss(
        work, head(work / "data" / "validation.jsonl", 24), adapter=work / name / "final" / "adapter"
    )
    assert got["val"][-1] == pytest.approx(theirs, rel=1e-4)


def test_activation_checkpointing_leaves_single_process_numbers_unchanged(shards, reference):
    work, overlay = shards
    got = run_metrics(
        train(
            work,
            overlay,
            "single-ckpt",
            *EXACT,
            "model.activations_checkpoint=true",
            "model.activations_checkpoint_layers=1",
        )
    )
    for key, want in reference[0].items():
        assert got[key] == pytest.approx(want, abs=1e-6), key


def test_only_rank_zero_writes_the_run_directory_and_prints(shards):
    work, overlay = shards
    proc = torchrun(work, overlay, "dp2-quiet", 2, "trainer.max_steps=1", "evaluation.generate.num_prompts=0")
    assert proc.stdout.count("run directory:") == 1
    assert "TP 1 x DP 2" in proc.stdout
    names = sorted("events" if p.name.startswith("events.out") else p.name for p in (work / "dp2-quiet").iterdir())
    assert names == ["config.yaml", "events", "final", "metrics.jsonl"]


def test_one_process_prepares_the_data_while_the_others_wait_then_all_map_it(shards):
    work, overlay = shards
    proc = torchrun(
        work,
        overlay,
        "dp2-prepare",
        2,
        "trainer.max_steps=1",
        "evaluation.generate.num_prompts=0",
        f"data.cache_dir={work / 'fresh-cache'}",
    )
    assert proc.stderr.count("train: preparing") == 1 and proc.stderr.count("val: preparing") == 1
    assert len(list((work / "fresh-cache").glob("*.prepared/*/prepared.json"))) == 2
    assert read_metrics(work / "dp2-prepare")["loss"]


def test_pipeline_parallel_training_is_refused_with_a_reason(shards):
    work, overlay = shards
    with pytest.raises(Exception, match="pipeline_model_parallel_size' is 2: 05 trains with tensor"):
        train(work, overlay, "pp2", "distributed_strategy.pipeline_model_parallel_size=2")


def test_a_world_size_that_tp_does_not_divide_is_refused(shards, monkeypatch):
    work, overlay = shards
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(Exception, match="3 processes cannot be split into tensor-parallel groups of 2"):
        train(work, overlay, "w3", "distributed_strategy.tensor_model_parallel_size=2")


def test_a_head_layout_that_training_cannot_use_is_refused_with_the_reason(train_mod):
    arch = train_mod.Arch(heads=4, kv_heads=2, inter=96, vocab=384, head_dim=16, hidden=64, layers=1)
    train_mod.Layout(arch, 4, 2, "trn1").check().check_trainable()  # rank r: Q head 2(r%2)+r//2, KV head r%2
    train_mod.Layout(arch, 4, 2, "trn2").check().check_trainable()  # rank r: Q head r, KV head r//2
    with pytest.raises(
        train_mod.StageError,
        match=r"num_key_value_heads x kv_replicator \(4\) must equal "
        r"tensor_model_parallel_size \(2\) on trn1",
    ):
        train_mod.Layout(arch, 2, 2, "trn1").check()
    with pytest.raises(train_mod.StageError, match="each rank would hold 2 Q heads and 4 KV heads"):
        train_mod.Layout(arch, 2, 4, "trn2").check().check_trainable()


def test_every_layout_05_trains_is_one_03_writes_with_each_q_head_beside_its_kv_head(train_mod):
    """Every (heads, KV heads, TP, kv_replicator, hw_backend): where 03 refuses a layout, 05 refuses it too;
    where 05 trains one, each rank holds exactly the Q and KV heads that 03 wrote into its shard; a layout 03
    writes but 05 refuses gives a rank more KV heads than Q heads. Each accepted layout pairs every local Q head
    with a local KV head."""
    convert = load_stage("03_convert_checkpoint.py")
    seen = {"both": 0, "only 03": 0, "neither": 0}
    for heads, kv in ((8, 1), (8, 2), (8, 8), (32, 8), (32, 4), (4, 2)):
        for tp in (1, 2, 4, 8, 16, 32):
            for m in (1, 2, 4, 8):
                for backend in ("trn1", "trn2"):
                    hd = 16
                    config = dict(
                        hidden_size=heads * hd,
                        intermediate_size=64 * 32,
                        num_attention_heads=heads,
                        num_key_value_heads=kv,
                        head_dim=hd,
                        vocab_size=128 * 32,
                        num_hidden_layers=1,
                    )
                    try:
                        theirs = convert.Layout(convert.arch_of(config), tp, m, backend).check()
                    except convert.StageError:
                        theirs = None
                    ours = train_mod.Layout(train_mod.arch_of(config), tp, m, backend)
                    try:
                        ours.check().check_trainable()
                    except train_mod.StageError as e:
                        seen["neither" if theirs is None else "only 03"] += 1
                        assert theirs is None or "each KV head needs its own Q heads" in str(e), (
                            heads,
                            kv,
                            tp,
                            m,
                            backend,
                        )
                        continue
                    assert theirs is not None, (heads, kv, tp, m, backend)
                    for r in range(tp):
                        q, kvh = ours.heads(r)
                        assert (q, kvh) == theirs.heads(r), (heads, kv, tp, m, backend, r)
                        # and grouped-query attention pairs each local Q head with a local KV head, in order
                        per = len(q) // len(kvh)
                        assert [h // (heads // kv) for h in q] == [kvh[i // per] for i in range(len(q))]
                    seen["both"] += 1
    assert min(seen.values()) > 10, seen


def test_a_checkpoint_converted_for_another_tp_size_is_refused(shards):
    work, overlay = shards
    with pytest.raises(Exception, match="converted with tensor_model_parallel_size = 2, this run needs 1"):
        train(work, overlay, "wrong-tp", f"exp_manager.resume_from_checkpoint={work / 'ckpt-tp2'}")


TINY_ARCH = dict(
    vocab=384,
    hidden=64,
    inter=96,
    layers=1,
    heads=4,
    kv_heads=1,
    head_dim=16,
    eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    tie=False,
)
TINY_LAYOUT = dict(tp=2, kv_mult=2, hw_backend="trn1")  # the one KV head copied to both ranks


def rank_shards(train_mod):
    """The LoRA modules of each of two tensor-parallel ranks (one KV head copied to both), with random LoRA
    weights sliced from one full set as the ranks of a real run hold them, and the flat vectors they gather."""
    c = train_mod.resolve(
        train_mod.load_config(
            ["config.yaml"], ["model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]"]
        ),
        train_mod.SCHEMA,
    )
    full = {}
    ranks = []
    for r in range(2):
        par = train_mod.Parallel(
            train_mod.Layout(train_mod.Arch(**TINY_ARCH), **TINY_LAYOUT),
            torch.device("cpu"),
            world=2,
            rank=r,
            connect=False,
        )
        torch.manual_seed(0)
        model = train_mod.Llama(train_mod.Arch(**TINY_ARCH), par=par)
        modules, _ = train_mod.add_lora(model, c, verbose=False)
        for name, m in modules:
            if name not in full:
                full[name] = (
                    torch.randn(m.lora_A.weight.shape[0], m.full[1]),
                    torch.randn(m.full[0], m.lora_B.weight.shape[1]),
                )
            a, b = full[name]
            with torch.no_grad():
                m.lora_A.weight.copy_(a[:, m.index] if m.parallel == "row" else a)
                m.lora_B.weight.copy_(b[m.index] if m.parallel == "column" else b)
        ranks.append(modules)
    flats = torch.stack(
        [
            torch.cat([t.detach().flatten() for _, m in mods for t in (m.lora_A.weight, m.lora_B.weight)])
            for mods in ranks
        ]
    )
    return ranks[0], flats, full


def test_the_adapter_is_reassembled_from_the_ranks_shards_on_the_host(train_mod):
    modules, flats, full = rank_shards(train_mod)
    rows = [train_mod.layout_rows(train_mod.Layout(train_mod.Arch(**TINY_ARCH), **TINY_LAYOUT), r) for r in range(2)]
    got = train_mod.assemble_lora(modules, flats, rows)
    assert got.keys() == full.keys()
    for name, (a, b) in full.items():
        assert torch.equal(got[name][0], a) and torch.equal(got[name][1], b), name


def test_replicated_copies_that_differ_are_reported_with_their_size(train_mod):
    modules, flats, _ = rank_shards(train_mod)
    rows = [train_mod.layout_rows(train_mod.Layout(train_mod.Arch(**TINY_ARCH), **TINY_LAYOUT), r) for r in range(2)]
    flats[1, :3] += 0.25  # the start of rank 1's copy of the first qkv_proj's (replicated) A
    with pytest.raises(
        train_mod.StageError,
        match=r"qkv_proj: tensor-parallel rank 1 holds a replicated copy that "
        r"differs from the first one in 3 of 1024 values \(largest "
        r"difference 0.25\)",
    ):
        train_mod.assemble_lora(modules, flats, rows)
