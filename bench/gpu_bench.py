#!/usr/bin/env python3
"""GPU benchmark at Llama-3-8B shapes: 05's training step against transformers + peft, bf16, one GPU.

    python bench/gpu_bench.py [--layers 32] [--seq 4096] [--steps 8]

Random weights of Llama-3-8B's shapes (hidden 4096, 14336 MLP, 32 heads / 8 KV heads, vocab 128256) in bf16,
LoRA r16 on all seven projections (ours: qkv_proj, o_proj, gate_up_proj, down_proj) in fp32 under bf16
autocast for both, micro-batch 1 x seq, packed rows of random documents (lengths 256..2048, the first
third of each is prompt), the same block-diagonal mask and position ids for both. Prints tokens/s, the
ratio, MFU against the card's dense bf16 datasheet peak (05's FLOP count), peak allocated memory, and 05's
--dry-run estimate for the same shapes next to our measured peak.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stage(name):
    spec = importlib.util.spec_from_file_location("s05_train", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def packed_rows(n, seq, vocab, train, seed=0):
    """n rows of random documents packed as 05 packs them, as dicts of CPU tensors, and 05's Windows of them."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    while len(docs) < 4 * n * seq // 512:
        length = int(torch.randint(256, 2049, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = length // 3
        docs.append((ids, [-100] * prompt + ids[prompt:]))
    windows = train.Windows.from_docs(docs, seq, True, pad_id=0)
    batch = windows.batch(range(n))
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)], windows


def hf_config(layers):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )


def timed(step, rows, warmup):
    for mb in rows[:warmup]:
        step(mb)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for mb in rows[warmup:]:
        step(mb)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def run_peft(hf, rows, warmup, train):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        hf, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS_PEFT, task_type="CAUSAL_LM")
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01)
    model.train()

    def step(mb):
        labels = torch.full_like(mb["input_ids"], -100)
        labels[:, 1:] = mb["targets"][:, :-1]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(
                input_ids=mb["input_ids"].cuda(),
                position_ids=mb["position_ids"].cuda(),
                attention_mask=train.document_mask(mb["segment_ids"].cuda()),
                labels=labels.cuda(),
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = timed(step, rows, warmup)
    model.unload()  # the base model again, for our copy of its weights
    return result


def ours_from_hf(hf, train, cfg):
    """Our model on the GPU with the HF model's weights (fused q|k|v and gate|up, as stage 03 lays them out)."""
    with torch.device("cuda"):
        model = train.Llama(cfg, torch.bfloat16)
    sd = hf.state_dict()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(sd["model.embed_tokens.weight"])
        model.model.norm.weight.copy_(sd["model.norm.weight"])
        model.lm_head.weight.copy_(sd["lm_head.weight"])
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            layer.self_attn.qkv_proj.weight.copy_(torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
            layer.self_attn.o_proj.weight.copy_(sd[p + "self_attn.o_proj.weight"])
            layer.mlp.gate_up_proj.weight.copy_(
                torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            )
            layer.mlp.down_proj.weight.copy_(sd[p + "mlp.down_proj.weight"])
            layer.input_layernorm.weight.copy_(sd[p + "input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
    return model


def run_ours(model, rows, warmup, train, c):
    modules, params = train.add_lora(model, c, verbose=False)
    optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01)
    model.train()
    device = torch.device("cuda")

    def step(mb):
        n = int((mb["targets"] != -100).sum())
        (train.loss_sum(model, mb, device, True) / n).backward()
        coef = torch.clamp(1.0 / (train.global_grad_norm(modules, model.par) + 1e-6), max=1.0)  # 05's clip at 1.0
        for p in params:
            p.grad.mul_(coef)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, rows, warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    train = stage("05_train.py")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 8B parameters in fp32 would need 32 GB
    with torch.device("cuda"):
        hf = LlamaForCausalLM(hf_config(args.layers))
    torch.set_default_dtype(torch.float32)
    hf.config._attn_implementation = "sdpa"
    cfg = train.Arch(
        vocab=128256,
        hidden=4096,
        inter=14336,
        layers=args.layers,
        heads=32,
        kv_heads=8,
        head_dim=128,
        eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None,
        tie=False,
    )
    rows, windows = packed_rows(args.warmup + args.steps, args.seq, 128256, train)
    timed_rows = rows[args.warmup :]
    tokens = sum(int((mb["segment_ids"] > 0).sum()) for mb in timed_rows)
    flops = float(train.window_flops(windows, cfg)[args.warmup : len(rows)].sum())
    name = torch.cuda.get_device_name()
    peak = train.peak_flops(torch.device("cuda"), True, None)[0]

    peft_s, peft_mem = run_peft(hf, rows, args.warmup, train)
    ours_model = ours_from_hf(hf, train, cfg)
    del hf
    torch.cuda.empty_cache()
    peft = "model_alignment_strategy.peft."
    c = {
        peft + "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        peft + "lora_rank": 16,
        peft + "lora_alpha": 32.0,
        peft + "lora_dropout": 0.05,
        peft + "lora_bias": "none",
        peft + "lora_verbose": False,
        peft + "use_rslora": False,
        peft + "use_dora": False,
        "precision.type": "autocast",
        "data.micro_batch_size": 1,
        "data.seq_length": args.seq,
        "model.activations_checkpoint_layers": None,
    }
    ours_s, ours_mem = run_ours(ours_model, rows, args.warmup, train, c)
    est = train.memory_estimate(cfg, c, 1, max(int((mb["targets"] != -100).sum()) for mb in rows), trainium=False)

    result = {
        "device": name,
        "torch": torch.__version__,
        "layers": args.layers,
        "seq": args.seq,
        "timed_steps": args.steps,
        "tokens": tokens,
        "ours_tokens_per_s": tokens / ours_s,
        "peft_tokens_per_s": tokens / peft_s,
        "ratio": peft_s / ours_s,
        "ours_mfu": flops / ours_s / peak if peak else None,
        "peft_mfu": flops / peft_s / peak if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "ours_peak_gib": ours_mem,
        "peft_peak_gib": peft_mem,
        "dry_run_estimate_gib": (est["frozen base"] + est["LoRA weights, gradients, AdamW"] + est["activations"])
        / 2**30,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
