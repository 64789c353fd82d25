"""05's training semantics against transformers: val_loss, token-weighted accumulation, clipping, schedule."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import head, hf_masked_loss, train
from transformers import AutoTokenizer


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_baseline_val_loss_equals_transformers_masked_cross_entropy(pipeline, packing):
    work, overlay = pipeline
    metrics = train(
        work,
        overlay,
        f"base-{packing}",
        "trainer.max_steps=0",
        f"model_alignment_strategy.sft.packing={packing}",
        "evaluation.generate.num_prompts=0",
    )
    assert len(metrics) == 1 and metrics[0]["step"] == 0
    expected = hf_masked_loss(work, head(work / "data" / "validation.jsonl", 24))
    assert metrics[0]["val_loss"] == pytest.approx(expected, abs=1e-5)


def test_chat_template_val_loss_equals_transformers_on_the_assistant_turn(pipeline):
    work, overlay = pipeline
    metrics = train(
        work,
        overlay,
        "chat",
        "trainer.max_steps=0",
        "data.prompt_format=chat_template",
        "evaluation.generate.num_prompts=0",
    )
    expected = hf_masked_loss(work, head(work / "data" / "validation.jsonl", 24), fmt="chat_template")
    assert metrics[0]["val_loss"] == pytest.approx(expected, abs=1e-5)


def autocast_setup(train_mod, work, overlay, precision):
    """05's model, LoRA parameters, optimizer and two training windows, as a run with this precision builds them."""
    c = train_mod.resolve(
        train_mod.load_config(
            ["config.yaml", str(overlay)],
            [f"precision.type={precision}", "model_alignment_strategy.peft.lora_dropout=0"],
        ),
        train_mod.SCHEMA,
    )
    arch = train_mod.read_model_config(c["model.model_config"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    model, modules, params = train_mod.build_model(c, arch, device, train_mod.Parallel(train_mod.Layout(arch), device))
    tok = AutoTokenizer.from_pretrained(c["data.tokenizer.type"])
    windows = train_mod.load_split(c["data.train_dir"], tok, c, "train", None)
    return model, params, train_mod.make_optimizer(modules, c, device), windows.batch([0, 1])


def test_autocast_trains_lora_in_fp32_over_a_bf16_base(train_mod, pipeline):
    work, overlay = pipeline
    model, params, optimizer, mb = autocast_setup(train_mod, work, overlay, "autocast")
    lora = {id(p) for p in params}
    base = [p for p in model.parameters() if id(p) not in lora]
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    loss = train_mod.loss_sum(model, mb, torch.device("cpu"), autocast=True)
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in params)
    assert all(
        v.dtype == torch.float32
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    # the bf16 base really computes in bf16: the loss differs from fp32's, by a bf16-sized amount
    fp32_model, _, _, _ = autocast_setup(train_mod, work, overlay, "fp32")
    exact = train_mod.loss_sum(fp32_model, mb, torch.device("cpu"), autocast=False).item()
    again = train_mod.loss_sum(fp32_model, mb, torch.device("cpu"), autocast=False).item()
    assert again == exact and 1e-6 < abs(loss.item() - exact) / exact < 2e-2


@pytest.mark.parametrize("fmt", ["raw", "chat_template"])
def test_first_step_loss_is_the_token_weighted_mean_over_the_whole_step(pipeline, fmt):
    """Step 1's loss (LoRA B = 0, so the base model) equals transformers' loss over exactly that step's records,
    weighting every supervised token equally, not averaging per-micro-batch means; in both prompt formats."""
    work, overlay = pipeline
    metrics = train(
        work,
        overlay,
        f"step1-{fmt}",
        "trainer.max_steps=1",
        "data.global_batch_size=4",
        f"data.prompt_format={fmt}",
        "model_alignment_strategy.sft.packing=false",
        "evaluation.generate.num_prompts=0",
    )
    records = head(work / "data" / "training.jsonl", 24)
    # the documented order: a permutation of the windows (here one record each) seeded by seed + epoch
    chosen = [records[i] for i in torch.randperm(24, generator=torch.Generator().manual_seed(1234))[:4].tolist()]
    assert metrics[1]["loss"] == pytest.approx(hf_masked_loss(work, chosen, fmt), abs=1e-5)


def test_min_lr_is_the_floor_and_a_schedule_shorter_than_the_run_holds_it(train_mod):
    c = {
        "model.optim.lr": 1.0,
        "model.optim.sched.warmup_steps": 10,
        "model.optim.sched.min_lr": 0.1,
        "model.optim.sched.max_steps": 50,
        "trainer.max_steps": 100,
        "model.optim.sched.name": "linear",
    }
    assert train_mod.lr_at(30, c) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway from warmup's end to step 50
    assert [train_mod.lr_at(s, c) for s in (50, 51, 99)] == pytest.approx([0.1] * 3)
    cosine = dict(c, **{"model.optim.sched.name": "cosine"})
    assert train_mod.lr_at(30, cosine) == pytest.approx(0.55) and train_mod.lr_at(70, cosine) == pytest.approx(0.1)


def test_losses_do_not_depend_on_the_micro_batch_size(pipeline):
    work, overlay = pipeline
    common = [
        "trainer.max_steps=3",
        "data.global_batch_size=4",
        "evaluation.generate.num_prompts=0",
        "model_alignment_strategy.peft.lora_dropout=0",
    ]
    one = [m["loss"] for m in train(work, overlay, "mbs1", *common, "data.micro_batch_size=1") if "loss" in m]
    four = [m["loss"] for m in train(work, overlay, "mbs4", *common, "data.micro_batch_size=4") if "loss" in m]
    assert len(one) == 3 and one == pytest.approx(four, abs=1e-5)


def adapter_b_norm(run_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    return torch.sqrt(sum((v.double() ** 2).sum() for k, v in tensors.items() if "lora_B" in k)).item()


def test_clipping_acts_on_the_gradients_that_are_stepped(pipeline):
    """One AdamW step from B = 0 with eps = 1 moves B by lr * g / (|g| + 1): with the gradient clipped to norm
    1e-6 the move is at most lr * 1e-6. Clipping stale gradients (the reference's bug) would leave it large."""
    work, overlay = pipeline
    common = [
        "trainer.max_steps=1",
        "model.optim.eps=1.0",
        "model.optim.weight_decay=0.0",
        "model.optim.lr=0.01",
        "evaluation.generate.num_prompts=0",
    ]
    metrics = train(work, overlay, "clipped", *common, "trainer.gradient_clip_val=1e-6")
    clipped = adapter_b_norm(work / "clipped")
    free = (
        adapter_b_norm(work / "unclipped")
        if train(work, overlay, "unclipped", *common, "trainer.gradient_clip_val=null")
        else None
    )
    assert metrics[1]["grad_norm"] > 1e-3  # the logged norm is the one before clipping
    assert 0 < clipped <= 0.01 * 1e-6 * 1.001
    assert free > 100 * clipped


def test_training_lowers_the_validation_loss_and_ends_with_validation(pipeline):
    work, overlay = pipeline
    metrics = train(
        work, overlay, "learn", "trainer.max_steps=12", "trainer.val_check_interval=6", "model.optim.lr=0.02"
    )
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.1
    assert "val_loss" in metrics[-1] and metrics[-1]["step"] == 12
    assert {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "supervised_tokens_per_s",
        "consumed_samples",
        "mfu",
        "peak_memory_gib",
    } <= set(metrics[1])
    assert 0 < metrics[1]["mfu"] < 1 and metrics[1]["supervised_tokens_per_s"] < metrics[1]["tokens_per_s"]
    assert 0.0 <= metrics[-1]["gen_exact_match"] <= 1.0 and metrics[-1]["gen_samples"] == 4


def test_warmup_then_linear_decay(train_mod):
    c = {
        "model.optim.lr": 1.0,
        "model.optim.sched.warmup_steps": 10,
        "model.optim.sched.min_lr": 0.0,
        "model.optim.sched.max_steps": None,
        "trainer.max_steps": 110,
        "model.optim.sched.name": "linear",
    }
    assert train_mod.lr_at(0, c) == pytest.approx(0.1)
    assert train_mod.lr_at(9, c) == pytest.approx(1.0)
    assert train_mod.lr_at(60, c) == pytest.approx(0.5)
    assert train_mod.lr_at(110, c) == pytest.approx(0.0)
    assert train_mod.lr_at(35, dict(c, **{"model.optim.sched.name": "cosine"})) == pytest.approx(
        0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.25))
    )


def test_flops_count_4n_per_token_the_output_layer_where_supervised_and_real_attention(train_mod):
    cfg = train_mod.Arch(hidden=8, head_dim=2, heads=4, kv_heads=2, layers=3, inter=16, vocab=100)
    docs = [
        ([1, 5, 6], [-100, 5, 6]),
        ([2, 7], [-100, 7]),  # window 0: documents of 3 and 2 tokens, 3 supervised
        ([9], [-100]),
    ]  # window 1: one token, nothing supervised
    windows = train_mod.Windows.from_docs(docs, 5, True, pad_id=0)
    assert len(windows) == 2
    body = 3 * (8 * (4 + 2 * 2) * 2 + 4 * 2 * 8 + 3 * 8 * 16)
    attention = 3 * 4 * 3 * 4 * 2 * (6 + 3)  # keys seen: 1+2+3 and 1+2
    expected = 4 * body * 5 + 4 * 8 * 100 * 3 + attention
    per_window = train_mod.window_flops(windows, cfg)
    assert float(per_window[0]) == expected
    assert float(per_window[1]) == 4 * body * 1 + 3 * 4 * 3 * 4 * 2 * 1  # one token, seeing itself


def test_the_cpu_peak_probe_leaves_the_training_rng_alone(train_mod):
    state = torch.get_rng_state()
    peak, source = train_mod.peak_flops(torch.device("cpu"), autocast=False, configured=None)
    assert peak > 0 and "measured" in source and torch.equal(state, torch.get_rng_state())


def test_loraplus_steps_like_peft_s_loraplus_optimizer_on_the_same_gradients(train_mod, pipeline):
    """B matrices at 4x the learning rate of the A matrices, weight decay on both: PEFT's create_loraplus_optimizer
    over the same model, given the same gradients, makes the same updates (torch's AdamW on the CPU, and the
    device-side AdamW of accelerators)."""
    from peft.optimizers import create_loraplus_optimizer

    work, overlay = pipeline
    c = train_mod.resolve(
        train_mod.load_config(["config.yaml", str(overlay)], ["model.optim.loraplus_lr_ratio=4"]), train_mod.SCHEMA
    )
    model = train_mod.Llama(train_mod.read_model_config(c["model.model_config"]))
    torch.manual_seed(0)
    modules, params = train_mod.add_lora(model, c, verbose=False)
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    opt = dict(lr=1e-2, betas=tuple(c["model.optim.betas"]), eps=c["model.optim.eps"])
    theirs = create_loraplus_optimizer(
        model, torch.optim.AdamW, loraplus_lr_ratio=4, loraplus_weight_decay=c["model.optim.weight_decay"], **opt
    )
    assert [g["lr"] for g in theirs.param_groups if g["params"]] == [1e-2, 4e-2]

    def stepped(step):
        with torch.no_grad():
            for p, s, g in zip(params, start, grads):
                p.copy_(s)
                p.grad = g.clone()
        step()
        return [p.detach().clone() for p in params]

    expected = stepped(theirs.step)
    ours = train_mod.make_optimizer(modules, c, torch.device("cpu"))
    run = SimpleNamespace(c=dict(c, **{"trainer.gradient_clip_val": None}), params=params, optimizer=ours)
    got = stepped(lambda: train_mod.apply_update(run, 1e-2, None, torch.tensor(False)))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    device_side = train_mod.DeviceAdamW(
        train_mod.optimizer_groups(modules, c), weight_decay=c["model.optim.weight_decay"], **opt
    )
    got = stepped(lambda: device_side.step(torch.tensor(1e-2), skip=torch.tensor(False)))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, expected))
    moved = [(a - s).abs().max().item() for a, s in zip(got, start)]
    assert moved[1] > 2 * moved[0]  # B moved further than A: its learning rate is 4x


def test_neftune_noise_is_transformers_neftune_noise_on_the_same_embeddings_and_seed(train_mod):
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = torch.randn(2, 7, 16)
    module = torch.nn.Module()
    module.neftune_noise_alpha = 5.0
    torch.manual_seed(3)
    theirs = neftune_post_forward_hook(module, None, embeddings)
    torch.manual_seed(3)
    ours = train_mod.neftune(embeddings, 5.0)
    assert (ours - embeddings).abs().max() <= 5.0 / (7 * 16) ** 0.5
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_each_row_s_neftune_noise_is_transformers_hook_s_on_that_row_without_its_padding(train_mod):
    """The scale alpha / sqrt(L x d) takes L, per row, as the real positions: row 0, 4 real positions in 7, gets
    transformers' noise for a 4-position sequence, the same uniform draws scaled by sqrt(7 / 4)."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = torch.randn(2, 7, 16)
    module = torch.nn.Module()
    module.neftune_noise_alpha = 5.0
    torch.manual_seed(3)
    whole_rows = neftune_post_forward_hook(module, None, embeddings) - embeddings
    torch.manual_seed(3)
    ours = train_mod.neftune(embeddings, 5.0, torch.tensor([4, 7])) - embeddings
    assert torch.allclose(ours[0], whole_rows[0] * (7 / 4) ** 0.5, rtol=0, atol=1e-6)
    assert torch.allclose(ours[1], whole_rows[1], rtol=0, atol=1e-6)


def test_neftune_counts_the_same_positions_whether_a_device_cuts_the_padding_or_keeps_whole_rows(
    train_mod, pipeline, monkeypatch
):
    work, overlay = pipeline
    model, _, _, _ = autocast_setup(train_mod, work, overlay, "fp32")
    windows = train_mod.load_split(
        str(work / "data" / "training.jsonl"),
        AutoTokenizer.from_pretrained(str(work / "tokenizer")),
        train_mod.resolve(train_mod.load_config(["config.yaml", str(overlay)], []), train_mod.SCHEMA),
        "train",
        None,
    )
    padded = [int(w) for w in np.argsort(windows.n_tokens)[:2]]  # the two shortest windows: padding at their ends
    mb, seen, neftune = windows.batch(padded), [], train_mod.neftune
    monkeypatch.setattr(
        train_mod, "neftune", lambda x, a, lengths: seen.append((x.shape[1], lengths)) or neftune(x, a, lengths)
    )
    model.neftune_alpha = 5.0
    for fixed in (False, True):  # CPU and CUDA cut the trailing padding; Trainium and compiled layers keep it
        model.fixed_shapes = fixed
        train_mod.loss_sum(model, mb, torch.device("cpu"), autocast=False)
    (cut, counted_cut), (whole, counted_whole) = seen
    assert cut < whole == windows.seq_len
    assert counted_cut.tolist() == counted_whole.tolist() == windows.n_tokens[padded].tolist()


def test_neftune_adds_noise_in_training_only_never_in_evaluation(pipeline):
    work, overlay = pipeline
    common = [
        "trainer.max_steps=1",
        "model_alignment_strategy.peft.lora_dropout=0.0",
        "evaluation.generate.num_prompts=0",
    ]
    plain = train(work, overlay, "no-neftune", *common)
    noisy = train(work, overlay, "neftune", *common, "model_alignment_strategy.sft.neftune_noise_alpha=5")
    assert noisy[0]["val_loss"] == plain[0]["val_loss"]  # the baseline evaluation: no noise
    assert noisy[1]["loss"] != plain[1]["loss"]  # the training step: noise
