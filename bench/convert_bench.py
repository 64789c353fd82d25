#!/usr/bin/env python3
"""Benchmark of stage 03: peak memory and throughput of converting a synthetic Llama checkpoint (about 4 GiB,
bf16, sharded safetensors) to the NxDT layout at TP 8, against the disk's plain sequential read speed
measured in the same run on the same files.

    python bench/convert_bench.py [--layers 9] [--tp 8] [--kv-replicator 1] [--vocab 32768] [--work work/bench/convert]
    python bench/convert_bench.py --full     # Llama-3-8B whole (32 layers, vocabulary 128,256: 16 GB) to TP 32
                                             # with each KV head copied 4 times, the tutorial's trn1 layout

Prints one table: input size, largest output shard, peak resident memory of the converter process (and the
bound: largest shard + 1 GiB), conversion time and throughput, sequential read throughput and the ratio.
Page cache: the script asks the kernel to drop it before each timed read (root only); it says whether that
worked, since warm and cold reads differ by an order of magnitude.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def synthetic_model(out, layers, hidden=4096, inter=14336, heads=32, kv=8, vocab=32768):
    """A Llama-shaped checkpoint of bf16 tensors in 1-GiB-ish shards with an index (content is arbitrary)."""
    out.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (heads * hd, hidden),
                p + "self_attn.k_proj.weight": (kv * hd, hidden),
                p + "self_attn.v_proj.weight": (kv * hd, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * hd),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    weight_map, shard, size, n = {}, {}, 0, 0
    gen = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        shard[name] = torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 2**30:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "num_hidden_layers": layers,
                "vocab_size": vocab,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "tie_word_embeddings": False,
            }
        )
    )
    return total


def drop_page_cache():
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sequential_read(files):
    start, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while block := fh.read(16 * 2**20):
                total += len(block)
    return total / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--kv-replicator", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--full", action="store_true", help="Llama-3-8B whole: 32 layers, vocabulary 128256, TP 32, KV x4")
    ap.add_argument("--work", default=str(ROOT / "work" / "bench" / "convert"))
    ap.add_argument("--make-model-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full:
        args.layers, args.vocab, args.tp, args.kv_replicator = 32, 128256, 32, 4
    work = Path(args.work)
    model = work / "hf"
    if args.make_model_only:
        synthetic_model(model, args.layers, vocab=args.vocab)
        return
    shutil.rmtree(work, ignore_errors=True)
    # Built in a child process: a child forked from a big parent would report the parent's memory as its peak.
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--make-model-only",
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
            "--work",
            str(work),
        ],
        check=True,
    )
    files = sorted(model.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)

    cold = drop_page_cache()
    read_bps = sequential_read(files)

    overlay = work / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "model": {"hf_weights_dir": str(model), "model_config": str(model / "config.json")},
                "exp_manager": {"resume_from_checkpoint": str(work / "ckpt")},
                "distributed_strategy": {"tensor_model_parallel_size": args.tp, "kv_replicator": args.kv_replicator},
            }
        )
    )
    drop_page_cache()
    # A small wrapper process runs the converter, so its children's peak is the converter's alone.
    measure = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            measure,
            sys.executable,
            str(ROOT / "03_convert_checkpoint.py"),
            "--config",
            str(ROOT / "config.yaml"),
            "--config",
            str(overlay),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    seconds, peak = float(out[0]), int(out[1])
    largest = max(p.stat().st_size for p in (work / "ckpt" / "model").iterdir())

    gib = 2**30
    print(
        f"| synthetic model | {size / gib:.2f} GiB ({size / 1e9:.2f} GB) bf16, {args.layers} layers of Llama-3-8B "
        f"shape, vocabulary {args.vocab:,}, TP {args.tp}, KV heads copied {args.kv_replicator}x |"
    )
    print(f"| page cache dropped before timed reads | {'yes' if cold else 'no (not root): warm-cache figures'} |")
    print(f"| largest output shard | {largest / gib:.3f} GiB |")
    print(
        f"| peak resident memory of 03 | {peak / gib:.3f} GiB (bound: largest shard + 1 GiB = "
        f"{(largest + gib) / gib:.3f} GiB) {'OK' if peak < largest + gib else 'OVER'} |"
    )
    print(f"| conversion | {seconds:.1f} s, {size / seconds / 2**20:.0f} MiB/s of input |")
    print(f"| plain sequential read of the same files | {read_bps / 2**20:.0f} MiB/s |")
    print(f"| conversion / sequential read | {size / seconds / read_bps:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
