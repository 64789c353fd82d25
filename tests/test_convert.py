"""Stage 03: NxD's checkpoint layout for every TP / PP / KV-replication setting, and the way back to HF."""

import json

import pytest
import torch
from conftest import load_stage, make_hf_model, run_stage, tiny_settings, write_overlay
from safetensors.torch import load_file

convert = load_stage("03_convert_checkpoint.py")


def settings(tmp_path, tp=1, pp=1, m=1, fuse=False, backend="trn1"):
    return write_overlay(
        tmp_path / "o.yaml",
        {
            "model.hf_weights_dir": str(tmp_path / "hf"),
            "model.model_config": str(tmp_path / "hf" / "config.json"),
            "exp_manager.resume_from_checkpoint": str(tmp_path / "ckpt"),
            "model.fuse_qkv": fuse,
            "distributed_strategy.tensor_model_parallel_size": tp,
            "distributed_strategy.pipeline_model_parallel_size": pp,
            "distributed_strategy.kv_replicator": m,
            "distributed_strategy.hw_backend": backend,
        },
    )


@pytest.fixture
def hf_dir(tmp_path, tokenizer_dir):
    make_hf_model(tmp_path / "hf", tokenizer_dir, num_hidden_layers=3)  # 3 layers: an uneven PP split
    return tmp_path / "hf"


@pytest.mark.parametrize(
    "tp,pp,m,fuse,backend",
    [
        (1, 1, 1, False, "trn1"),
        (2, 1, 1, False, "trn1"),
        (2, 2, 1, True, "trn1"),
        (4, 1, 2, False, "trn1"),
        (4, 2, 2, True, "trn1"),
        (4, 1, 2, False, "trn2"),
        (4, 2, 2, True, "trn2"),
        (1, 2, 1, True, "trn1"),
    ],
)
def test_hf_to_nxdt_to_hf_is_bit_exact(tmp_path, hf_dir, tp, pp, m, fuse, backend):
    overlay = settings(tmp_path, tp, pp, m, fuse, backend)
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    shards = sorted(p.name for p in (tmp_path / "ckpt" / "model").iterdir())
    assert shards == sorted(f"dp_rank_00_tp_rank_{r:02d}_pp_rank_{s:02d}.pt" for r in range(tp) for s in range(pp))
    run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--to-hf",
            str(tmp_path / "back"),
        ]
    )
    original, back = (
        load_file(str(hf_dir / "model.safetensors")),
        load_file(str(tmp_path / "back" / "model.safetensors")),
    )
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def shard(tmp_path, r, s=0):
    return torch.load(tmp_path / "ckpt" / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_{s:02d}.pt", weights_only=True)


def test_trn1_replication_pairs_each_rank_s_q_heads_with_its_kv_head(tmp_path, hf_dir):
    """4 Q heads, 2 KV heads, TP 4, kv_replicator 2: rank r holds Q head 2*(r%2) + r//2 and KV head r%2."""
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(settings(tmp_path, 4, 1, 2))])
    hf = load_file(str(hf_dir / "model.safetensors"))
    q, k = hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    o = hf["model.layers.0.self_attn.o_proj.weight"]
    for r in range(4):
        s, head, kv = shard(tmp_path, r), 2 * (r % 2) + r // 2, r % 2
        assert torch.equal(s["model.layers.0.self_attn.qkv_proj.weight_q"], q[head * 16 : (head + 1) * 16])
        assert torch.equal(s["model.layers.0.self_attn.qkv_proj.weight_k"], k[kv * 16 : (kv + 1) * 16])
        assert torch.equal(s["model.layers.0.self_attn.o_proj.weight"], o[:, head * 16 : (head + 1) * 16])


def test_llama3_8b_on_trn1_32_ranks_uses_nxd_s_head_order():
    config = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "num_hidden_layers": 32,
    }
    layout = convert.Layout(convert.arch_of(config), tp=32, kv_mult=4, hw_backend="trn1").check()
    assert [layout.heads(r) for r in range(32)] == [([4 * (r % 8) + r // 8], [r % 8]) for r in range(32)]
    assert convert.Layout(convert.arch_of(config), tp=8, kv_mult=1, hw_backend="trn1").heads(1)[0] == [4, 5, 6, 7]


def test_llama3_8b_on_trn2_32_ranks_puts_each_kv_head_s_copies_on_adjacent_ranks():
    """NxD on trn2 lays replicated KV heads out as (K0, K0, K0, K0), (K1, ...), ... and keeps Q heads in order,
    so rank r holds Q head r and KV head r // 4: its own group's."""
    config = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "num_hidden_layers": 32,
    }
    layout = convert.Layout(convert.arch_of(config), tp=32, kv_mult=4, hw_backend="trn2").check()
    assert [layout.heads(r) for r in range(32)] == [([r], [r // 4]) for r in range(32)]
    assert convert.Layout(convert.arch_of(config), tp=16, kv_mult=2, hw_backend="trn2").heads(3)[1] == [1]


def test_pipeline_stages_split_layers_evenly_with_the_remainder_last():
    config = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
        "num_hidden_layers": 30,
    }
    stages = convert.pipeline_stages(convert.arch_of(config), 4)
    assert [len(s) for s in stages] == [7, 7, 8, 8] and stages[3] == range(22, 30)


def test_gate_up_shard_is_the_rank_s_gate_rows_then_its_up_rows(tmp_path, hf_dir):
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(settings(tmp_path, 2))])
    hf = load_file(str(hf_dir / "model.safetensors"))
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(shard(tmp_path, 1)["model.layers.1.mlp.gate_up_proj.weight"], torch.cat([gate[48:], up[48:]]))


def test_a_tp_size_that_does_not_divide_is_named_and_nothing_is_written(tmp_path, hf_dir):
    proc = run_stage(
        ["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(settings(tmp_path, 3))], check=False
    )
    assert proc.returncode == 1
    assert "tensor_model_parallel_size 3 does not divide num_attention_heads (4)" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_an_unknown_tensor_name_is_refused(tmp_path, hf_dir):
    state = load_file(str(hf_dir / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.extra"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(state, str(hf_dir / "model.safetensors"))
    proc = run_stage(
        ["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(settings(tmp_path))], check=False
    )
    assert proc.returncode == 1 and "unexpected tensor 'model.layers.0.self_attn.rotary_emb.extra'" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def test_reverse_conversion_names_a_missing_shard(tmp_path, hf_dir):
    overlay = settings(tmp_path, 2, 2)
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    (tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_01_pp_rank_01.pt").unlink()
    proc = run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--to-hf",
            str(tmp_path / "back"),
        ],
        check=False,
    )
    assert proc.returncode == 1 and "dp_rank_00_tp_rank_01_pp_rank_01.pt: shard missing" in proc.stderr
    assert not (tmp_path / "back").exists()


def test_replicated_kv_copies_that_disagree_are_caught(tmp_path, hf_dir):
    overlay = settings(tmp_path, 4, 1, 2)
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    path = tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_02_pp_rank_00.pt"
    state = torch.load(path, weights_only=True)
    state["model.layers.0.self_attn.qkv_proj.weight_k"] += 1
    torch.save(state, path)
    proc = run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--to-hf",
            str(tmp_path / "back"),
        ],
        check=False,
    )
    assert proc.returncode == 1 and "replicated KV head 0" in proc.stderr


def peft_adapter(hf_dir, out, targets, **variant):
    """A PEFT adapter for the model in hf_dir with random (non-zero) B (and DoRA magnitudes moved off their start),
    saved the way PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(hf_dir)),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **variant),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_merged_model_gives_base_plus_adapter_logits(tmp_path, hf_dir, variant):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = peft_adapter(
        hf_dir,
        tmp_path / "adapter",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        **variant,
    )
    overlay = settings(tmp_path, 4, 2, 2)
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--to-hf",
            str(tmp_path / "merged"),
            "--merge-adapter",
            str(adapter),
        ]
    )
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(hf_dir)), str(adapter)).eval()(ids)
        merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(ids)
        base = LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()(ids)
    assert (expected.logits - base.logits).abs().max() > 1e-3
    assert (merged.logits - expected.logits).abs().max().item() < 1e-5


def test_an_adapter_for_another_model_is_refused(tmp_path, hf_dir, tokenizer_dir):
    make_hf_model(tmp_path / "other", tokenizer_dir, num_hidden_layers=3, intermediate_size=128)
    adapter = peft_adapter(tmp_path / "other", tmp_path / "adapter", ["down_proj"])
    overlay = settings(tmp_path)
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    proc = run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--to-hf",
            str(tmp_path / "merged"),
            "--merge-adapter",
            str(adapter),
        ],
        check=False,
    )
    assert proc.returncode == 1 and "do not fit 'model.layers.0.mlp.down_proj.weight'" in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_verify_accepts_a_fresh_conversion_and_catches_a_truncated_or_changed_file(tmp_path, hf_dir):
    overlay = settings(tmp_path, 2, 1)
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    verify = ["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay), "--verify"]
    assert "2 file(s) match manifest.json" in run_stage(verify).stdout
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    entry = manifest["files"]["model/dp_rank_00_tp_rank_01_pp_rank_00.pt"]
    assert entry["tensors"]["model.layers.0.mlp.down_proj.weight"] == {"shape": [64, 48], "dtype": "float32"}
    path = tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt"
    path.write_bytes(path.read_bytes()[:-10])
    proc = run_stage(verify, check=False)
    assert proc.returncode == 1 and "the manifest says" in proc.stderr and "truncated" in proc.stderr
    proc = run_stage([*verify, "model.fuse_qkv=true"], check=False)
    assert proc.returncode == 1 and "converted with fuse_qkv = False, the config says True" in proc.stderr


def test_a_truncated_input_file_is_named_and_nothing_is_written(tmp_path, hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    proc = run_stage(
        ["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(settings(tmp_path, 2))], check=False
    )
    assert proc.returncode == 1 and "model.safetensors: not a readable safetensors file" in proc.stderr
    assert "truncated?" in proc.stderr and not (tmp_path / "ckpt").exists()


def test_a_single_pytorch_model_bin_converts_like_safetensors(tmp_path, hf_dir):
    original = load_file(str(hf_dir / "model.safetensors"))
    torch.save(original, hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    overlay = settings(tmp_path)
    run_stage(
        ["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay), "--tp", "2", "--fuse-qkv"]
    )
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["settings"]["tensor_model_parallel_size"] == 2 and manifest["settings"]["fuse_qkv"] is True
    run_stage(
        [
            "03_convert_checkpoint.py",
            "--config",
            "config.yaml",
            "--config",
            str(overlay),
            "--tp",
            "2",
            "--fuse-qkv",
            "--to-hf",
            str(tmp_path / "back"),
        ]
    )
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_a_missing_input_shard_is_named_and_nothing_is_written(tmp_path, hf_dir):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(str(hf_dir)).save_pretrained(str(hf_dir), max_shard_size="100KB")
    (hf_dir / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (hf_dir / victim).unlink()
    proc = run_stage(
        ["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(settings(tmp_path, 2))], check=False
    )
    assert proc.returncode == 1 and f"{victim}: shard named in the index is missing" in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def through_02_and_03(tmp_path, tokenizer_dir):
    """A random tiny HF model through 02 (local directory source) and 03; returns the settings."""
    make_hf_model(tmp_path / "hf_source", tokenizer_dir)
    settings = tiny_settings(tmp_path)
    overlay = write_overlay(tmp_path / "overlay.yaml", settings)
    run_stage(["02_download_model.py", "--config", "config.yaml", "--config", str(overlay)])
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    return settings


def test_checkpoint_layout_has_nxdt_names(tmp_path, tokenizer_dir):
    through_02_and_03(tmp_path, tokenizer_dir)
    state = torch.load(tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt", weights_only=True)
    assert {k for k in state if ".layers.0." in k} == {
        f"model.layers.0.{n}"
        for n in (
            "self_attn.qkv_proj.weight_q",
            "self_attn.qkv_proj.weight_k",
            "self_attn.qkv_proj.weight_v",
            "self_attn.o_proj.weight",
            "mlp.gate_up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        )
    }
    assert state["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(state)


def test_converter_replaces_its_earlier_output_only_with_overwrite(tmp_path, tokenizer_dir):
    through_02_and_03(tmp_path, tokenizer_dir)
    overlay = tmp_path / "overlay.yaml"
    proc = run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)], check=False)
    assert proc.returncode == 1 and "holds an earlier output of this stage; pass --overwrite" in proc.stderr
    run_stage(["03_convert_checkpoint.py", "--overwrite", "--config", "config.yaml", "--config", str(overlay)])


def test_converter_rejects_a_shape_that_disagrees_with_config(tmp_path, tokenizer_dir):
    make_hf_model(tmp_path / "hf_source", tokenizer_dir)
    overlay = write_overlay(tmp_path / "overlay.yaml", tiny_settings(tmp_path))
    run_stage(["02_download_model.py", "--config", "config.yaml", "--config", str(overlay)])
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(raw))
    proc = run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)], check=False)
    assert proc.returncode == 1
    assert "mlp.gate_proj.weight' has shape [96, 64], config.json implies [128, 64]" in proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.tmp").exists()
