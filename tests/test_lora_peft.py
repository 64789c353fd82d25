"""Hand-written LoRA: semantics of the layer, and the exported adapter loads in peft with identical logits."""

import json
import warnings

import pytest
import torch
from conftest import head, hf_masked_loss, make_hf_model, run_stage, tiny_settings, train, write_overlay

TARGETS = [
    ["qkv_proj"],
    ["o_proj"],
    ["gate_up_proj"],
    ["down_proj"],
    ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
]
PEFT = "model_alignment_strategy.peft."


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    """A tiny random HF model converted through 02 and 03 (shared by the tests of this module)."""
    work = tmp_path_factory.mktemp("lora")
    hf = make_hf_model(work / "hf_source", tokenizer_dir)
    overlay = write_overlay(work / "overlay.yaml", tiny_settings(work))
    run_stage(["02_download_model.py", "--config", "config.yaml", "--config", str(overlay)])
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    return work, hf


def lora_settings(train, work, targets, bias="none", *overrides):
    cfg = train.resolve(
        train.load_config(
            ["config.yaml", str(work / "overlay.yaml")],
            [f"{PEFT}target_modules=[{','.join(targets)}]", f"{PEFT}lora_bias={bias}", *overrides],
        ),
        train.SCHEMA,
    )
    return cfg


def trained_looking_model(train, work, c):
    """Our model with LoRA added and B (and DoRA's magnitudes) randomized, as if trained (B = 0 would hide export
    mistakes)."""
    model = train.Llama(train.read_model_config(c["model.model_config"]))
    train.load_base_weights(model, c["exp_manager.resume_from_checkpoint"], False)
    torch.manual_seed(5)
    train.add_lora(model, c)
    with torch.no_grad():
        for _, m in train.lora_modules(model, train.LORA_TARGETS):
            if m.lora_B is not None:
                m.lora_B.weight.normal_(0, 0.05)
            if m.magnitude is not None:
                m.magnitude.mul_(1 + 0.1 * torch.randn_like(m.magnitude))
    return model.eval()


def export(train, model, c, path):
    """What 05 does at the end of a run: gather the LoRA weights (one rank here) and write the PEFT adapter."""
    modules = [(n, m) for n, m in train.lora_modules(model, train.LORA_TARGETS) if m.lora_A is not None]
    return train.export_peft_adapter(train.gather_lora(modules, model.par), model.arch, c, path)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "+".join(t))
def test_exported_adapter_loads_in_peft_with_the_same_logits(converted, train_mod, targets, variant):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    work, _ = converted
    c = lora_settings(train_mod, work, targets, "none", f"{PEFT}use_dora={variant == 'dora'}")
    model = trained_looking_model(train_mod, work, c)
    adapter = export(train_mod, model, c, work / f"adapter-{variant}-{'-'.join(targets)}")
    ids = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(model(ids, torch.arange(50).expand(2, 50), train_mod.document_mask(torch.ones_like(ids))))
    base = LlamaForCausalLM.from_pretrained(str(work / "hf_weights")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mis-named tensor would only warn and load a no-op adapter
        # peft itself touches a deprecated transformers property; that says nothing about our adapter.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    with torch.no_grad():
        plain = LlamaForCausalLM.from_pretrained(str(work / "hf_weights")).eval()(ids).logits
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the logits for this test to mean anything"
    assert (ours - theirs).abs().max().item() < 1e-5


def test_adapter_config_names_hf_modules_and_scaling(converted, train_mod):
    work, _ = converted
    c = lora_settings(train_mod, work, ["qkv_proj", "gate_up_proj"])
    adapter = export(train_mod, trained_looking_model(train_mod, work, c), c, work / "adapter-cfg")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert config["target_modules"] == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


def test_a_new_export_replaces_the_adapter_files_only_and_keeps_anything_else_there(converted, train_mod):
    work, _ = converted
    c = lora_settings(train_mod, work, ["qkv_proj"])
    out = work / "adapter-kept" / "adapter"
    export(train_mod, trained_looking_model(train_mod, work, c), c, out)  # an earlier export
    (out / "NOTES.md").write_text("mine")
    earlier = (out / "adapter_model.safetensors").read_bytes()
    c = lora_settings(train_mod, work, ["qkv_proj"], "none", f"{PEFT}lora_rank=4")
    export(train_mod, trained_looking_model(train_mod, work, c), c, out)
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "NOTES.md").read_text() == "mine"
    assert (out / "adapter_model.safetensors").read_bytes() != earlier


@pytest.mark.parametrize("theirs", ["adapter_model.safetensors", "adapter_config.json"])
def test_an_adapter_05_did_not_export_or_one_edited_since_is_never_replaced(converted, train_mod, theirs):
    """Adapter files are replaced only where 05 exported them (its weights carry the stage and the sha256 of the
    config written with them): a copy of someone else's adapter, or an edited config, stops the export unchanged."""
    work, _ = converted
    c = lora_settings(train_mod, work, ["qkv_proj"])
    out = work / f"adapter-{theirs}" / "adapter"
    model = trained_looking_model(train_mod, work, c)
    export(train_mod, model, c, out)
    (out / theirs).write_text((out / theirs).read_text(errors="ignore") + " ")  # theirs now, or edited
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(train_mod.StageError, match="adapter files this stage did not export, or edited since"):
        export(train_mod, model, c, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept


def test_fused_qkv_lora_shares_one_A_across_q_k_v(converted, train_mod):
    from safetensors.torch import load_file

    work, _ = converted
    c = lora_settings(train_mod, work, ["qkv_proj"])
    adapter = export(train_mod, trained_looking_model(train_mod, work, c), c, work / "adapter-a")
    t = load_file(str(adapter / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0.self_attn."
    assert torch.equal(t[p + "q_proj.lora_A.weight"], t[p + "k_proj.lora_A.weight"])
    assert torch.equal(t[p + "q_proj.lora_A.weight"], t[p + "v_proj.lora_A.weight"])
    assert t[p + "q_proj.lora_B.weight"].shape == (64, 16) and t[p + "k_proj.lora_B.weight"].shape == (32, 16)


def test_lora_layer_starts_as_the_base_layer_and_scales_by_alpha_over_r(train_mod):
    torch.manual_seed(0)
    layer = train_mod.LoRALinear((6, 8), torch.float32)
    torch.nn.init.normal_(layer.weight)
    layer.init_lora(rank=4, alpha=2.0, dropout=0.0)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), x @ layer.weight.T)  # B = 0 at init
    torch.nn.init.normal_(layer.lora_B.weight)
    expected = x @ layer.weight.T + 0.5 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.lora_A.weight.dtype == torch.float32 and not layer.weight.requires_grad


def test_lora_dropout_zeroes_a_fraction_p_and_rescales_the_rest_by_one_over_one_minus_p(train_mod):
    layer = train_mod.LoRALinear((6, 8), torch.float32)
    layer.init_lora(rank=2, alpha=4.0, dropout=0.25)
    layer.train()
    torch.manual_seed(0)
    dropped = layer.dropout(torch.ones(400_000))
    assert abs(float((dropped == 0).float().mean()) - 0.25) < 0.005
    assert torch.allclose(dropped.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs(float(dropped.mean()) - 1.0) < 0.01  # the expectation is the input's
    layer.eval()
    assert torch.equal(layer.dropout(torch.ones(10)), torch.ones(10))  # no dropout in evaluation


def test_lora_weights_stay_fp32_over_a_bf16_base(train_mod):
    layer = train_mod.LoRALinear((6, 8), torch.bfloat16)
    layer.init_lora(rank=2, alpha=4.0, dropout=0.0)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32


def test_only_lora_weights_are_trainable(converted, train_mod):
    work, _ = converted
    c = lora_settings(train_mod, work, ["o_proj", "down_proj"])
    model = train_mod.Llama(train_mod.read_model_config(c["model.model_config"]))
    _, params = train_mod.add_lora(model, c)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if ".lora_" in n}
    assert len(params) == len(trainable) == 2 * 2 * 2  # 2 layers x 2 targets x (A, B)


def test_unknown_lora_target_is_an_error(converted, train_mod):
    work, _ = converted
    c = lora_settings(train_mod, work, ["q_proj"])
    with pytest.raises(train_mod.StageError, match=r"unknown target\(s\) \['q_proj'\]"):
        train_mod.check_settings(c)


def test_an_adapter_on_a_mistral_model_loads_in_peft_on_transformers_mistral(tmp_path, tokenizer_dir, train_mod):
    """Mistral is trained as the Llama it is (no sliding window); its adapter must load on MistralForCausalLM."""
    from peft import PeftModel
    from transformers import MistralForCausalLM

    make_hf_model(tmp_path / "hf_source", tokenizer_dir, family="mistral", sliding_window=None)
    overlay = write_overlay(tmp_path / "overlay.yaml", tiny_settings(tmp_path))
    run_stage(["02_download_model.py", "--config", "config.yaml", "--config", str(overlay)])
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    c = lora_settings(train_mod, tmp_path, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    model = trained_looking_model(train_mod, tmp_path, c)
    adapter = export(train_mod, model, c, tmp_path / "adapter")
    ids = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.logits(model(ids, torch.arange(50).expand(2, 50), train_mod.document_mask(torch.ones_like(ids))))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    base = MistralForCausalLM.from_pretrained(str(tmp_path / "hf_weights")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_rslora_scales_the_update_by_alpha_over_the_square_root_of_the_rank(train_mod):
    layer = train_mod.LoRALinear((6, 8), torch.float32)
    layer.init_lora(rank=16, alpha=32.0, dropout=0.0, rslora=True)
    assert layer.scaling == 8.0  # 32 / sqrt(16), where plain LoRA scales by 32 / 16


def test_an_adapter_trained_with_rslora_gives_in_peft_the_val_loss_05_reports(pipeline):
    work, overlay = pipeline
    metrics = train(
        work,
        overlay,
        "rslora",
        f"{PEFT}use_rslora=true",
        f"{PEFT}target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
        "trainer.max_steps=3",
        "evaluation.generate.num_prompts=0",
    )
    adapter = work / "rslora" / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True
    first, last = metrics[0]["val_loss"], metrics[-1]["val_loss"]
    assert abs(last - first) > 1e-3, "the adapter must change the loss for this test to mean anything"
    theirs = hf_masked_loss(work, head(work / "data" / "validation.jsonl", 24), adapter=adapter)
    assert last == pytest.approx(theirs, rel=1e-4)


def test_dora_starts_as_the_base_layer_with_each_row_s_norm_as_its_magnitude(train_mod):
    torch.manual_seed(0)
    layer = train_mod.LoRALinear((6, 8), torch.float32)
    torch.nn.init.normal_(layer.weight)
    layer.init_lora(rank=4, alpha=8.0, dropout=0.0, dora=True)
    assert torch.allclose(layer.magnitude, layer.weight.norm(dim=1))
    x = torch.randn(3, 8)
    assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-6)


def test_an_adapter_trained_with_dora_gives_in_peft_the_val_loss_05_reports(pipeline):
    work, overlay = pipeline
    metrics = train(
        work,
        overlay,
        "dora",
        f"{PEFT}use_dora=true",
        f"{PEFT}target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
        "trainer.max_steps=3",
        "evaluation.generate.num_prompts=0",
    )
    adapter = work / "dora" / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    first, last = metrics[0]["val_loss"], metrics[-1]["val_loss"]
    assert abs(last - first) > 1e-3, "the adapter must change the loss for this test to mean anything"
    theirs = hf_masked_loss(work, head(work / "data" / "validation.jsonl", 24), adapter=adapter)
    assert last == pytest.approx(theirs, rel=1e-4)


def test_a_tenth_of_a_percent_on_a_dora_magnitude_moves_the_bf16_output_exactly_as_in_peft(train_mod):
    """Under bf16 autocast m / ||W'|| stays fp32 until the sum, as in PEFT: a change below bf16's resolution (0.4%)
    still moves the outputs that it moves in PEFT, by as much."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Module()
    base.proj = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    ours = train_mod.LoRALinear((48, 64), torch.bfloat16)
    with torch.no_grad():
        ours.weight.copy_(base.proj.weight)
    ours.init_lora(rank=4, alpha=8.0, dropout=0.0, dora=True)
    theirs = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True)).base_model
    layer = theirs.model.proj
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.1)
        magnitude = ours.dora_norm() * (1 + 0.05 * torch.randn(48))
        ours.magnitude.copy_(magnitude)
        for name, value in (("lora_A", ours.lora_A.weight), ("lora_B", ours.lora_B.weight)):
            getattr(layer, name)["default"].weight.copy_(value)
        layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    x = torch.randn(32, 64)

    def outputs():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(x).float(), layer(x).float()

    before = outputs()
    with torch.no_grad():
        ours.magnitude.mul_(1.001)
        layer.lora_magnitude_vector["default"].weight.mul_(1.001)
    after = outputs()
    moved = [a != b for a, b in zip(after, before)]
    assert moved[1].float().mean() > 0.1  # in PEFT a fifth of the outputs change
    assert torch.equal(moved[0], moved[1]) and torch.equal(after[0], after[1])


def paired_layers(train_mod, dora, dropout=0.0, dtype=torch.float32):
    """Our LoRALinear and PEFT's LoRA layer over the same base weight, with the same (trained-looking) A, B and
    DoRA magnitude."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Module()
    base.proj = torch.nn.Linear(64, 48, bias=False).to(dtype)
    ours = train_mod.LoRALinear((48, 64), dtype)
    with torch.no_grad():
        ours.weight.copy_(base.proj.weight)
    ours.init_lora(rank=4, alpha=8.0, dropout=dropout, dora=dora)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], use_dora=dora)
    theirs = get_peft_model(base, config).base_model.model.proj
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.1)
        for name in ("lora_A", "lora_B"):
            getattr(theirs, name)["default"].weight.copy_(getattr(ours, name).weight)
        if dora:
            ours.magnitude.copy_(ours.dora_norm() * (1 + 0.05 * torch.randn(48)))
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return ours, theirs


def trainable_grads(ours, theirs):
    mine = [ours.lora_A.weight.grad, ours.lora_B.weight.grad]
    peft = [theirs.lora_A["default"].weight.grad, theirs.lora_B["default"].weight.grad]
    if ours.magnitude is not None:
        mine.append(ours.magnitude.grad)
        peft.append(theirs.lora_magnitude_vector["default"].weight.grad)
    return mine, peft


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_dropout_acts_on_the_input_of_A_as_in_peft_under_one_fixed_mask(train_mod, dora):
    """With one dropout mask given to both layers, the outputs and the gradients of A, B (and the magnitude) are
    PEFT's: the mask applies to x before A (and, with DoRA, to the base term's input), nowhere else."""
    ours, theirs = paired_layers(train_mod, dora, dropout=0.3)
    ours.train(), theirs.train()
    mask = (torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) >= 0.3) / 0.7
    ours.dropout = lambda x: x * mask
    theirs.lora_dropout["default"] = type("FixedMask", (torch.nn.Module,), {"forward": lambda self, x: x * mask})()
    x = torch.randn(32, 64)
    y_ours, y_theirs = ours(x), theirs(x)
    assert (y_ours - x @ ours.weight.T).abs().max() > 1e-2, "the adapter must act for this test to mean anything"
    assert torch.allclose(y_ours, y_theirs, atol=1e-5)
    (y_ours.square().sum()).backward()
    (y_theirs.square().sum()).backward()
    for mine, peft in zip(*trainable_grads(ours, theirs)):
        assert torch.allclose(mine, peft, rtol=1e-4, atol=1e-5)


def test_one_dora_backward_gives_peft_s_gradients_of_a_b_and_the_magnitude(train_mod):
    """DoRA's weight norm is a constant of the backward pass (detached, as in the paper and PEFT): the gradients of
    A, B and the magnitude equal PEFT's."""
    ours, theirs = paired_layers(train_mod, dora=True)
    x = torch.randn(32, 64)
    target = torch.randn(32, 48)
    for layer in (ours, theirs):
        (layer(x) - target).square().sum().backward()
    mine, peft = trainable_grads(ours, theirs)
    assert all(g.abs().max() > 1e-3 for g in mine), "every trained tensor must get a gradient"
    for a, b in zip(mine, peft):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
