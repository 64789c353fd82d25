"""Our Llama, loaded through stages 02 and 03, computes the same logits as transformers.LlamaForCausalLM."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import LLAMA3_ROPE, make_hf_model, run_stage, tiny_settings, write_overlay


def convert(tmp_path, tokenizer_dir, fuse_qkv=False, **model_overrides):
    """Random tiny HF model -> 02 (local directory source) -> 03; returns (hf model, settings)."""
    hf = make_hf_model(tmp_path / "hf_source", tokenizer_dir, **model_overrides)
    settings = dict(tiny_settings(tmp_path), **{"model.fuse_qkv": fuse_qkv})
    overlay = write_overlay(tmp_path / "overlay.yaml", settings)
    run_stage(["02_download_model.py", "--config", "config.yaml", "--config", str(overlay)])
    run_stage(["03_convert_checkpoint.py", "--config", "config.yaml", "--config", str(overlay)])
    return hf, settings


def our_model(train, settings):
    cfg = train.read_model_config(settings["model.model_config"])
    model = train.Llama(cfg)
    train.load_base_weights(model, settings["exp_manager.resume_from_checkpoint"], settings["model.fuse_qkv"])
    return model.eval()


def our_logits(train, model, ids):
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model.logits(model(ids, pos, train.document_mask(torch.ones_like(ids))))


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # GQA (4 heads, 2 KV heads), untied
        dict(tie_word_embeddings=True),
        dict(num_key_value_heads=4),  # plain multi-head attention
        dict(rope_parameters=LLAMA3_ROPE),  # Llama-3.1 frequency scaling
        dict(head_dim=32),  # head_dim != hidden / heads
        dict(family="mistral", sliding_window=None, rope_theta=1e6),  # Mistral v0.2+: a Llama without a window
        dict(family="mistral", sliding_window=4096),  # a window longer than the sequence: no effect
    ],
    ids=["gqa-untied", "tied", "mha", "rope-llama3", "head-dim", "mistral", "mistral-long-window"],
)
def test_logits_match_transformers(tmp_path, tokenizer_dir, train_mod, case):
    hf, settings = convert(tmp_path, tokenizer_dir, **case)
    ids = torch.randint(0, hf.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = our_logits(train_mod, our_model(train_mod, settings), ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_a_mistral_window_shorter_than_the_sequence_is_refused(tmp_path, tokenizer_dir, train_mod):
    """Mistral-7B-v0.1 attends to its last 4096 tokens only; training it as a full-attention Llama would differ."""
    _, settings = convert(tmp_path, tokenizer_dir, family="mistral", sliding_window=32)
    assert train_mod.read_model_config(settings["model.model_config"]).sliding_window == 32
    proc = run_stage(
        ["05_train.py", "--config", "config.yaml", "--config", str(tmp_path / "overlay.yaml")], check=False
    )
    assert proc.returncode == 1
    assert "sliding_window 32 is shorter than data.seq_length 64" in proc.stderr.splitlines()[-1]


def test_llama3_rope_scales_low_frequencies_smooths_the_middle_band_and_keeps_high_ones(train_mod):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = train_mod.Arch(
        vocab=8,
        hidden=64,
        inter=8,
        layers=1,
        heads=4,
        kv_heads=4,
        head_dim=16,
        rope_theta=LLAMA3_ROPE["rope_theta"],
        rope_scaling=dict(LLAMA3_ROPE),
    )
    ours = train_mod.rope_inv_freq(arch)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](
        LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(LLAMA3_ROPE)), "cpu"
    )
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    plain = train_mod.rope_inv_freq(dataclasses.replace(arch, rope_scaling=None))
    old, factor = LLAMA3_ROPE["original_max_position_embeddings"], LLAMA3_ROPE["factor"]
    wavelen = 2 * math.pi / plain
    high, low = wavelen < old / LLAMA3_ROPE["high_freq_factor"], wavelen > old / LLAMA3_ROPE["low_freq_factor"]
    middle = ~high & ~low
    assert high.any() and middle.any() and low.any()
    assert torch.equal(ours[high], plain[high]) and torch.allclose(ours[low], plain[low] / factor)
    assert ((ours[middle] < plain[middle]) & (ours[middle] > plain[middle] / factor)).all()


def test_fused_qkv_checkpoint_gives_the_same_logits(tmp_path, tokenizer_dir, train_mod):
    hf, settings = convert(tmp_path, tokenizer_dir, fuse_qkv=True)
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (our_logits(train_mod, our_model(train_mod, settings), ids) - expected).abs().max().item() < 1e-4


def test_legacy_rope_scaling_keys_are_read_like_transformers(tmp_path, tokenizer_dir, train_mod):
    """Meta's Llama-3.1 config.json has top-level rope_theta and rope_scaling instead of rope_parameters."""
    hf, settings = convert(tmp_path, tokenizer_dir, rope_parameters=LLAMA3_ROPE)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = torch.randint(0, hf.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
    assert (our_logits(train_mod, our_model(train_mod, settings), ids) - expected).abs().max().item() < 1e-4


def test_checkpoint_with_a_missing_tensor_is_refused(tmp_path, tokenizer_dir, train_mod):
    _, settings = convert(tmp_path, tokenizer_dir)
    (tmp_path / "ckpt" / "manifest.json").unlink()  # as NxD's own converter writes it: no manifest
    path = tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    state = torch.load(path, weights_only=True)
    del state["model.layers.1.mlp.down_proj.weight"]
    torch.save(state, path)
    with pytest.raises(train_mod.StageError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"):
        our_model(train_mod, settings)


def test_checkpoint_with_a_wrong_shape_is_refused(tmp_path, tokenizer_dir, train_mod):
    _, settings = convert(tmp_path, tokenizer_dir)
    (tmp_path / "ckpt" / "manifest.json").unlink()
    path = tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    state = torch.load(path, weights_only=True)
    state["model.norm.weight"] = torch.ones(65)
    torch.save(state, path)
    with pytest.raises(train_mod.StageError, match=r"'model.norm.weight' has shape \[65\], expected \[64\]"):
        our_model(train_mod, settings)


def test_unfused_checkpoint_loaded_as_fused_names_the_flag(tmp_path, tokenizer_dir, train_mod):
    _, settings = convert(tmp_path, tokenizer_dir)
    with pytest.raises(train_mod.StageError, match="converted with fuse_qkv = False, this run needs True"):
        our_model(train_mod, dict(settings, **{"model.fuse_qkv": True}))
    (tmp_path / "ckpt" / "manifest.json").unlink()  # without a manifest the tensor names give it away
    with pytest.raises(train_mod.StageError, match="model.fuse_qkv"):
        our_model(train_mod, dict(settings, **{"model.fuse_qkv": True}))


def test_a_truncated_shard_is_caught_by_its_manifest_size(tmp_path, tokenizer_dir, train_mod):
    _, settings = convert(tmp_path, tokenizer_dir)
    path = tmp_path / "ckpt" / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(train_mod.StageError, match=r"manifest.json says \d+ \(truncated\?\)"):
        our_model(train_mod, settings)
