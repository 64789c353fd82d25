"""Stage 02: local HF directories, Meta checkpoints and the Hub client, each verified before it reports success."""

import json
import os

import torch
from conftest import make_hf_model, run_stage, write_overlay

FAKE_TOKEN = "hf_" + "Zq7" * 12  # shaped like a real token, so any leak would be visible


def stage02(tmp_path, source, env=None, check=True):
    overlay = write_overlay(
        tmp_path / "o.yaml",
        {
            "model.download.source": str(source),
            "model.hf_weights_dir": str(tmp_path / "out" / "weights"),
            "model.model_config": str(tmp_path / "out" / "config.json"),
            "data.tokenizer.type": str(tmp_path / "out" / "tokenizer"),
        },
    )
    return run_stage(
        ["02_download_model.py", "--config", "config.yaml", "--config", str(overlay)], env=env, check=check
    )


def logits(model_dir, ids):
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(str(model_dir)).eval()(ids).logits


def to_meta(hf_dir, meta_dir, tokenizer_dir, model):
    """Write `model` in Meta's original layout (the inverse of the HF converter), with HF tokenizer files."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads

    def interleave(w, n):  # HF rotate-half rows -> Meta's interleaved rotary pairs
        return w.view(n, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(n * hd, w.shape[1])

    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {}
    for name, t in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            state["norm.weight"] = t
        elif name == "lm_head.weight":
            state["output.weight"] = t
        else:
            _, _, i, *rest = name.split(".")
            leaf = ".".join(rest[:-1])
            if leaf == "self_attn.q_proj":
                t = interleave(t, cfg.num_attention_heads)
            elif leaf == "self_attn.k_proj":
                t = interleave(t, cfg.num_key_value_heads)
            state[f"layers.{i}.{names[leaf]}.weight"] = t.clone()
    meta_dir.mkdir()
    torch.save(state, meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(
        json.dumps(
            {
                "dim": cfg.hidden_size,
                "n_layers": cfg.num_hidden_layers,
                "n_heads": cfg.num_attention_heads,
                "n_kv_heads": cfg.num_key_value_heads,
                "vocab_size": cfg.vocab_size,
                "norm_eps": cfg.rms_norm_eps,
                "rope_theta": cfg.rope_parameters["rope_theta"],
                "max_seq_len": 256,
            }
        )
    )
    for f in tokenizer_dir.iterdir():
        (meta_dir / f.name).write_bytes(f.read_bytes())


def test_meta_checkpoint_converts_to_identical_logits(tmp_path, tokenizer_dir):
    model = make_hf_model(tmp_path / "hf", tokenizer_dir)
    to_meta(tmp_path / "hf", tmp_path / "meta", tokenizer_dir, model)
    out = stage02(tmp_path, tmp_path / "meta").stdout
    assert "converting Meta checkpoint" in out
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(tmp_path / "out" / "weights", ids), logits(tmp_path / "hf", ids))


def test_local_directory_is_copied_and_verified(tmp_path, tokenizer_dir):
    make_hf_model(tmp_path / "hf", tokenizer_dir)
    stage02(tmp_path, tmp_path / "hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists()


def sharded_model(tmp_path, tokenizer_dir):
    model = make_hf_model(tmp_path / "hf", tokenizer_dir)
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_a_missing_shard_is_named_and_nothing_is_written(tmp_path, tokenizer_dir):
    shards = sharded_model(tmp_path, tokenizer_dir)
    assert len(shards) > 1
    (tmp_path / "hf" / shards[1]).unlink()
    proc = stage02(tmp_path, tmp_path / "hf", check=False)
    assert proc.returncode == 1
    assert f"{tmp_path / 'hf'}: shard {shards[1]}, named in model.safetensors.index.json, is missing" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_shard_is_caught(tmp_path, tokenizer_dir):
    shards = sharded_model(tmp_path, tokenizer_dir)
    path = tmp_path / "hf" / shards[0]
    path.write_bytes(path.read_bytes()[:-100])
    proc = stage02(tmp_path, tmp_path / "hf", check=False)
    assert proc.returncode == 1 and f"{tmp_path / 'hf'}: {shards[0]} is not a readable safetensors file" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_refused(tmp_path, tokenizer_dir):
    make_hf_model(tmp_path / "hf", tokenizer_dir)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]  # a Mistral class over a Llama model_type: not one family
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    proc = stage02(tmp_path, tmp_path / "hf", check=False)
    assert proc.returncode == 1 and "architecture MistralForCausalLM (model_type llama), expected" in proc.stderr
    assert not (tmp_path / "out").exists()


def hub_cache(tmp_path, tokenizer_dir, repo="meta-llama/Tiny-Llama", commit="a" * 40):
    """The Hub client's own cache layout holding one snapshot of a tiny model (what a download leaves)."""
    cache = tmp_path / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    make_hf_model(snap, tokenizer_dir)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    return cache


def test_hub_repo_id_is_fetched_through_the_hub_client_and_the_token_never_leaks(tmp_path, tokenizer_dir):
    cache = hub_cache(tmp_path, tokenizer_dir)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_TOKEN=FAKE_TOKEN)
    proc = stage02(tmp_path, "meta-llama/Tiny-Llama", env=env)
    assert "from the Hugging Face Hub" in proc.stdout
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and not [p for p in written if FAKE_TOKEN.encode() in p.read_bytes()]
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    snap = next(cache.glob("models--*/snapshots/*"))
    assert torch.equal(logits(tmp_path / "out" / "weights", ids), logits(snap, ids))


def test_an_unknown_hub_repo_gets_a_clear_error(tmp_path, tokenizer_dir):
    cache = hub_cache(tmp_path, tokenizer_dir)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = stage02(tmp_path, "meta-llama/Not-There", env=env, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: meta-llama/Not-There")
