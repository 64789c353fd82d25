#!/usr/bin/env python3
r"""Stage 05: LoRA supervised fine-tuning of a Llama model, in one plain PyTorch loop.

What it does
  Loads the base model from the NxDT checkpoint that stage 03 wrote, wraps the configured projections with
  LoRA adapters, builds the SFT data (prompt masked, optionally packed with per-document positions and
  attention), trains the adapters with AdamW, evaluates, and exports the adapter in PEFT format.

Inputs (config keys)
  exp_manager.resume_from_checkpoint   NxDT checkpoint: <dir>/model/dp_rank_00_tp_rank_TT_pp_rank_00.pt, one per
                                       tensor-parallel rank (each rank loads only its own)
  model.model_config                   HF config.json of the base model
  data.tokenizer.type                  tokenizer directory
  data.train_dir, data.val_dir         JSON lines as stage 01 writes them: {input, output} or {messages, tools}
                                       records (01 reads every other file kind and record format; 05 refuses them
                                       with the 01 command that converts them); data.train_dir may list several

Outputs, in the run directory (exp_manager.explicit_log_dir, or <exp_dir>/<name>/<timestamp>), from rank 0
  config.yaml              the resolved config of the run (written when it starts, kept as it is on resume)
  resumes.jsonl            one line per resume: its step, checkpoint and the resumable keys it changed
  metrics.jsonl            one JSON object per logged step and per evaluation
  events.out.tfevents.*    TensorBoard scalars
  checkpoints/step_N/      every exp_manager.checkpoint_callback_params.every_n_train_steps steps
  final/adapter/           adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel
A non-empty run directory holding no run of this stage is refused, and so is a resume that changes what is trained
(any key but those config.yaml lists as resumable, or the content of data, tokenizer or base checkpoint); both before
data is prepared or the model loads. A launch failing before its first step removes the run directory it made.
Beside each data file (or under data.cache_dir), from one process per host: <file>.prepared/<key>/, the split
tokenized, masked and packed once, memory-mapped by every rank, reused while data, tokenizer and settings stay.

Features, their keys, and the functions that implement them
  LoRA rank/alpha/dropout/bias/targets   model_alignment_strategy.peft.*           LoRALinear, add_lora
    q|k|v and gate|up share one A (NxD)                                            peft_tensors (export)
  rsLoRA: scale alpha / sqrt(r)          model_alignment_strategy.peft.use_rslora  LoRALinear.init_lora
  DoRA: trained magnitude per row        model_alignment_strategy.peft.use_dora    LoRALinear.forward, dora_norm
  LoRA+: B at ratio x learning rate      model.optim.loraplus_lr_ratio             optimizer_groups
  NEFTune: noisy input embeddings        model_alignment_strategy.sft.*            neftune, Llama.forward
  PEFT adapter export                                                              gather_lora, export_peft_adapter
  packing with document isolation        model_alignment_strategy.sft.packing      pack, Windows.batch
  data prepared once, memory-mapped      data.cache_dir                            prepare_split, load_split
  01's records only, checked per line    data.train_dir, data.val_dir              check_data_file, training_record
  prompt format raw | chat_template      data.prompt_format                        tokenize, encode_batch
  conversations, assistant turns only    messages / ShareGPT / TRL records         conversation_texts
    tool calls, reasoning, tools schema  data.train_reasoning                      template_input
  several sources mixed by ratio         data.train_dir list, data.mix             write_prepared, epoch_order
  long records truncated or dropped      data.truncation                           tokenize, truncated
  token-weighted gradient accumulation   data.global_batch_size, micro_batch_size  micro_batches, train_step
  data order, a permutation per epoch    seed                                      step_indices, epoch_order
  tensor parallel (Megatron-style)       distributed_strategy.*                    Layout, Parallel, LoRALinear
  data parallel                          (torchrun world / TP)                     Parallel, sync_gradients
  activation checkpointing per layer     model.activations_checkpoint[_layers]     Llama.forward, recomputed
  warmup + linear/cosine decay           model.optim.sched.*                       lr_at
  AdamW (device-side on accelerators)    model.optim.*                             make_optimizer, DeviceAdamW
  gradient clipping (global norm)        trainer.gradient_clip_val                 global_grad_norm, apply_update
  non-finite steps: stop or skip         trainer.nonfinite                         LogInterval, DeviceAdamW
  evaluation, baseline only              trainer.val_check_interval, max_steps=0   evaluate, run_evaluation
  greedy generation, exact match         evaluation.generate.* (not on XLA)        generate, generation_eval
  precision fp32 | autocast (bf16)       precision.type                            new_model, loss_sum
  device auto|neuron|cuda|xla|cpu        trainer.accelerator, xla.neuron.*         pick_device (devices section)
  compiled decoder layers                trainer.compile                           compile_layers
  attention for packed rows              model.attention                           attention_mode, attention_spans
  metrics, TensorBoard, MFU              trainer.log_every_n_steps, peak_tflops    LogInterval, Metrics, window_flops
  run checkpoints, resume, SIGTERM       exp_manager.*                             save_run_checkpoint, resume_point
  inspect the label mask                 --inspect-data N                          inspect_data
  pre-flight checks + memory plan        --dry-run                                 dry_run, memory_estimate
  smoke run: the device path, tiny model --smoke [overrides]                       smoke, smoke_run, smoke_checks
  device self-check before weights load  (every launch)                            self_check, fallback_ops
  config check only (keys, ranges)       --check-config                            resolve, check_settings
  Neuron launch variables                --neuron-env                              neuron_environment
  Models: Llama 3 / 3.1, and Mistral without a sliding window below data.seq_length (the same model).

Commands (each runs as printed; what follows # is a comment)
  CPU:        python 05_train.py --config config.yaml --config demo.yaml
  CPU, TP 3:  torchrun --standalone --nproc_per_node 3 05_train.py --config config.yaml --config demo.yaml \
                  distributed_strategy.tensor_model_parallel_size=3   # the demo's 9 heads; converted by 03 with TP 3
  CUDA:       torchrun --standalone --nproc_per_node 8 05_train.py --config config.yaml trainer.accelerator=cuda \
                  distributed_strategy.tensor_model_parallel_size=8 distributed_strategy.kv_replicator=1
  trn1:       torchrun --nproc_per_node 32 05_train.py --config config.yaml     # trn1.32xlarge: TP 32, XLA
  trn2:       torchrun --nproc_per_node 64 05_train.py --config config.yaml trainer.accelerator=neuron \
                  trainer.compile=true distributed_strategy.tensor_model_parallel_size=4 \
                  distributed_strategy.kv_replicator=1 distributed_strategy.hw_backend=trn2 \
                  model.activations_checkpoint=true             # trn2.48xlarge, TorchNeuron; convert with TP 4
  Plan first: python 05_train.py --config config.yaml --dry-run
  New device: python 05_train.py --smoke trainer.accelerator=xla precision.type=autocast   # no config file
  All ranks:  torchrun --nproc_per_node 32 05_train.py --smoke trainer.accelerator=xla   # minutes; 1 on a failure
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

# ------------------------------------------------------------------------------------------------ settings
STAGE = "05_train.py"


# The config keys this stage reads, their types and valid ranges (validated before anything loads, in every mode).
SCHEMA = {
    "name": "str",
    "seed": "int in [0, 4294967295]",
    "trainer.accelerator": "auto|neuron|cuda|xla|cpu",
    "trainer.max_steps": "int >= 0",
    "trainer.log_every_n_steps": "int >= 1",
    "trainer.val_check_interval": "int >= 1",
    "trainer.gradient_clip_val": "float? > 0",
    "trainer.nonfinite": "stop|skip",
    "trainer.compile": "bool",
    "trainer.peak_tflops": "float? > 0",
    "trainer.device_memory_gib": "float? > 0",
    "exp_manager.exp_dir": "path",
    "exp_manager.explicit_log_dir": "path?",
    "exp_manager.resume_from_checkpoint": "path",
    "exp_manager.create_tensorboard_logger": "bool",
    "exp_manager.resume_if_exists": "bool",
    "exp_manager.checkpoint_callback_params.every_n_train_steps": "int >= 0",
    "exp_manager.checkpoint_callback_params.save_top_k": "int >= 1",
    "distributed_strategy.tensor_model_parallel_size": "int >= 1",
    "distributed_strategy.pipeline_model_parallel_size": "int >= 1",
    "distributed_strategy.kv_replicator": "int >= 1",
    "distributed_strategy.hw_backend": "trn1|trn2",
    "data.train_dir": "path+",
    "data.mix": "list[float]? > 0",
    "data.val_dir": "path?",
    "data.dev_choose_samples": "int? >= 1",
    "data.seq_length": "int >= 2",
    "data.micro_batch_size": "int >= 1",
    "data.global_batch_size": "int >= 1",
    "data.prompt_format": "raw|chat_template",
    "data.truncation": "truncate|drop",
    "data.train_reasoning": "bool",
    "data.cache_dir": "path?",
    "data.tokenizer.type": "path",
    "model.model_config": "path",
    "model.hf_weights_dir": "path",
    "model.fuse_qkv": "bool",
    "model.weight_init_only": "bool",
    "model.activations_checkpoint": "bool",
    "model.activations_checkpoint_layers": "int? >= 0",
    "model.attention": "auto|blocks|masked|causal",
    "model.optim.lr": "float > 0",
    "model.optim.weight_decay": "float >= 0",
    "model.optim.betas": "list[float] in [0, 1)",
    "model.optim.eps": "float > 0",
    "model.optim.sched.name": "linear|cosine",
    "model.optim.sched.warmup_steps": "int >= 0",
    "model.optim.sched.max_steps": "int? >= 1",
    "model.optim.sched.min_lr": "float >= 0",
    "model.optim.loraplus_lr_ratio": "float? > 0",
    "precision.type": "fp32|autocast",
    "model_alignment_strategy.sft.packing": "bool",
    "model_alignment_strategy.sft.neftune_noise_alpha": "float? > 0",
    "model_alignment_strategy.peft.lora_rank": "int >= 1",
    "model_alignment_strategy.peft.lora_alpha": "float > 0",
    "model_alignment_strategy.peft.lora_dropout": "float in [0, 1)",
    "model_alignment_strategy.peft.lora_bias": "none|all|lora_only",
    "model_alignment_strategy.peft.use_rslora": "bool",
    "model_alignment_strategy.peft.use_dora": "bool",
    "model_alignment_strategy.peft.lora_verbose": "bool",
    "model_alignment_strategy.peft.target_modules": "list[str]",
    "evaluation.generate.num_prompts": "int >= 0",
    "evaluation.generate.max_new_tokens": "int >= 1",
    "evaluation.generate.batch_size": "int >= 1",
    "evaluation.generate.show": "int >= 0",
    "xla.cache_dir": "path?",
    "xla.neuron.compiler_flags": "str",
    "xla.neuron.compiler_cache_url": "str",
    "xla.neuron.fuse_softmax": "bool",
    "xla.neuron.async_exec_max_inflight_requests": "int >= 1",
    "xla.neuron.rt_exec_timeout": "int >= 1",
    "xla.neuron.experimental_compress_rg": "bool",
}


# Keys a resumed run may change: when and how it logs, evaluates, checkpoints, stops and reports, where it finds its
# files, activation checkpointing (memory only: a recomputed layer replays its dropout). The others define the run.
RESUMABLE = set(
    """
name model.activations_checkpoint model.activations_checkpoint_layers trainer.max_steps
trainer.log_every_n_steps trainer.val_check_interval trainer.nonfinite trainer.peak_tflops
trainer.device_memory_gib exp_manager.exp_dir exp_manager.explicit_log_dir exp_manager.create_tensorboard_logger
exp_manager.resume_if_exists exp_manager.checkpoint_callback_params.every_n_train_steps
exp_manager.checkpoint_callback_params.save_top_k data.cache_dir model_alignment_strategy.peft.lora_verbose
evaluation.generate.num_prompts evaluation.generate.max_new_tokens evaluation.generate.batch_size
evaluation.generate.show xla.cache_dir xla.neuron.compiler_cache_url xla.neuron.async_exec_max_inflight_requests
xla.neuron.rt_exec_timeout
""".split()
)
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def as_list(x):
    """A value that may be one item or a list of them (data.train_dir), as a list."""
    return x if isinstance(x, list) else [x]


def warn(message):
    """A warning: one line on stderr, which every rank keeps (only rank 0 prints to stdout)."""
    print(f"warning: {message}", file=sys.stderr)


def check_settings(c, launched=True):
    """Cross-key checks that types and ranges alone cannot express, before anything heavy is loaded. `launched`:
    also check the settings against this launch's process count (not for --dry-run, which plans one)."""
    problems = []
    if len(c["model.optim.betas"]) != 2:
        problems.append(f"'model.optim.betas' must be two numbers, got {c['model.optim.betas']}")
    lr, floor = c["model.optim.lr"], c["model.optim.sched.min_lr"]
    if floor > lr:
        problems.append(f"'model.optim.sched.min_lr' ({floor}) must be <= 'model.optim.lr' ({lr})")
    if not c["model.weight_init_only"]:
        problems.append(
            "'model.weight_init_only: false' (optimizer state from resume_from_checkpoint) is not "
            "supported: the converted checkpoint holds model weights only"
        )
    unknown = [t for t in c["model_alignment_strategy.peft.target_modules"] if t not in LORA_TARGETS]
    if unknown or not c["model_alignment_strategy.peft.target_modules"]:
        problems.append(
            f"'model_alignment_strategy.peft.target_modules': unknown target(s) {unknown}; known: {LORA_TARGETS}"
        )
    sched_end, warmup = c["model.optim.sched.max_steps"], c["model.optim.sched.warmup_steps"]
    if sched_end is not None and sched_end < warmup:
        problems.append(
            f"'model.optim.sched.max_steps' ({sched_end}) must be >= 'model.optim.sched.warmup_steps' ({warmup}), or "
            f"null (the decay then ends at trainer.max_steps); below it the learning rate would rise to the end"
        )
    mix, sources = c["data.mix"], as_list(c["data.train_dir"])
    if mix is not None and len(mix) != len(sources):
        problems.append(f"'data.mix' has {len(mix)} weight(s) for {len(sources)} source(s) in 'data.train_dir'")
    if c["model.attention"] == "causal" and c["model_alignment_strategy.sft.packing"]:
        problems.append(
            "'model.attention: causal' would let packed documents attend to each other; use it only "
            "with model_alignment_strategy.sft.packing=false (or use masked / auto)"
        )
    tp, pp = (c[f"distributed_strategy.{k}_model_parallel_size"] for k in ("tensor", "pipeline"))
    if pp != 1:
        problems.append(
            f"'distributed_strategy.pipeline_model_parallel_size' is {pp}: 05 trains with tensor and data parallelism "
            f"only (a LoRA run of Llama 3 8B fits with TP alone); set it to 1 and convert the checkpoint with PP 1"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched and world == 1 and tp > 1 and not neuron_devices_present():
        problems.append(
            f"'distributed_strategy.tensor_model_parallel_size' is {tp}, the setting of config.yaml for "
            f"one trn1.32xlarge (torchrun --nproc_per_node {tp}), but this is one process on a host "
            f"without Trainium. To try the pipeline here: make demo, or add --config demo.yaml to each "
            f"stage's command; to train on one device: distributed_strategy.tensor_model_parallel_size=1 "
            f"distributed_strategy.kv_replicator=1, with the checkpoint converted by 03 for TP 1"
        )
    elif launched and world % tp:
        problems.append(
            f"{world} processes cannot be split into tensor-parallel groups of "
            f"{tp} (distributed_strategy.tensor_model_parallel_size); launch a multiple of {tp}"
        )
    elif launched:
        dp = world // tp
        if c["data.global_batch_size"] % (c["data.micro_batch_size"] * dp):
            problems.append(
                f"'data.global_batch_size' ({c['data.global_batch_size']}) must be a multiple of "
                f"'data.micro_batch_size' x data-parallel size ({c['data.micro_batch_size']} x {dp})"
            )
    if problems:
        raise StageError("; ".join(problems))


# ------------------------------------------------------------------------------------------------ model config
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def read_model_config(path):
    """The fields of an HF Llama config.json that the model needs (old and new rope key styles)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"model.model_config: {path} not found (stage 02 writes it)") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None
    family = raw.get("model_type", "llama")
    kind = (raw.get("architectures") or [FAMILIES.get(family, "?")])[0]
    if FAMILIES.get(family) != kind:  # Mistral is a Llama (same tensors and computation) up to its sliding window
        raise StageError(f"{path}: expected a LlamaForCausalLM or MistralForCausalLM config, got {kind} / {family}")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise StageError(f"{path}: '{key}: true' is not supported (Llama 3 has no biases)")
    try:
        arch = arch_of(raw)
    except KeyError as e:
        raise StageError(f"{path}: missing key {e}") from None
    if arch.rope_scaling is not None:
        kind = arch.rope_scaling.get("rope_type", arch.rope_scaling.get("type"))
        if kind != "llama3":
            raise StageError(f"{path}: rope scaling type {kind!r} is not supported (only 'llama3')")
    if arch.heads % arch.kv_heads:
        raise StageError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
    return arch


# ------------------------------------------------------------------------------------------------ model
def rope_inv_freq(arch):
    """RoPE inverse frequencies, with Llama-3.1 'llama3' frequency scaling when configured."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = arch.rope_scaling
    if s is None:
        return inv
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x, cos, sin):
    """HF's rotate-half RoPE: the checkpoint's q/k rows keep HF order, so no permutation is needed."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LoRALinear(nn.Module):
    """A frozen linear layer with an optional LoRA branch:
        y = x W^T + (alpha / r) * B(A(dropout(x)))        W: [out, in] frozen, A: [r, in], B: [out, r]
    A starts kaiming-uniform (a = sqrt 5) and B at zero, so training starts from the base model exactly; LoRA weights
    stay fp32 whatever the base dtype. Fused projections (qkv_proj, gate_up_proj) share one A, B's rows being the
    q|k|v (or gate|up) blocks (NxD's semantics); exported as separate PEFT adapters (A copied, B split), exactly.
    Tensor parallel: a column-parallel layer holds the output rows `index` of the full W, its A replicated and B holding
    the same rows; a row-parallel one the input columns `index`, its A holding those columns and B replicated. `full`
    is the unsplit (out, in) shape."""

    def __init__(self, full, dtype, par=None, parallel="column", index=None):
        super().__init__()
        self.full, self.par, self.parallel = full, par, parallel
        self.index = index if index is not None else torch.arange(full[0 if parallel == "column" else 1], device="cpu")
        out_f, in_f = full
        shape = (len(self.index), in_f) if parallel == "column" else (out_f, len(self.index))
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
        self.lora_A = self.lora_B = self.magnitude = None
        self.kv_rows_from = None  # qkv_proj: rows from here on are K/V, copied on ranks sharing a KV head

    def init_lora(self, rank, alpha, dropout, rslora=False, dora=False):
        """This layer's A (kaiming-uniform) and B (zeros), dropout probability and scale: alpha / rank, or with
        rsLoRA alpha / sqrt(rank) (rank-stabilized: the update's scale no longer shrinks as the rank grows). With
        DoRA also a magnitude per output row (fp32, held like B's rows), starting at the base weight's row norms."""
        # Drawn at full size on the CPU from the seeded CPU generator, then sliced: every device and every
        # tensor-parallel layout starts from the same A as a single process.
        a = nn.Linear(self.full[1], rank, bias=False, dtype=torch.float32, device="cpu")
        b = nn.Linear(rank, self.full[0], bias=False, dtype=torch.float32, device="cpu")
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        with torch.no_grad():
            if self.parallel == "row":
                a.weight = nn.Parameter(a.weight[:, self.index].contiguous())
            else:
                b.weight = nn.Parameter(b.weight[self.index].contiguous())
        self.lora_A, self.lora_B = a.to(self.weight.device), b.to(self.weight.device)
        self.p = dropout
        # p as a float32 tensor, made once: what a Python float becomes in eager mode too, whereas torch-xla
        # would compare with a Python float in float64, which NeuronCores do not have.
        self.p_tensor = torch.full((), dropout, device=self.weight.device)
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        if dora:
            self.magnitude = nn.Parameter(self.dora_norm())

    def dora_norm(self):
        """||W + scaling B A|| of each output row over the whole input dimension (a row-parallel layer sums its
        ranks' squares), detached as in the DoRA paper and PEFT."""
        if self.weight.is_meta:  # a memory plan: nothing to compute
            return torch.empty(self.weight.shape[0], device="meta")
        # detached, so that autocast does not cache its bf16 cast of B or A made here without a gradient: torch 2.9
        # (trn1's) would reuse that cast in the forward pass, and B would get no gradient
        b, a = self.lora_B.weight.detach(), self.lora_A.weight.detach()
        with torch.no_grad():
            squares = (self.weight.float() + self.scaling * (b @ a)).square().sum(1)
            return (self.par.all_reduce(squares, "tp") if self.parallel == "row" else squares).sqrt()

    def forward(self, x):
        y = self.base(x)
        if self.lora_A is None:
            return y
        dropped = self.dropout(x)
        # Column-parallel, A sees the replicated input and its output enters the TP region, so the gradient of the
        # replicated A is already the full one on every rank; row-parallel, A's partial products are summed over TP.
        a = self.lora_A(dropped)
        if self.par is not None:
            a = self.par.exit_tp_region(a) if self.parallel == "row" else self.par.enter_tp_region(a)
        if self.magnitude is None:
            return lora_add(y, a, self.lora_B.weight, self.scaling)
        # DoRA as PEFT computes it: y + (s - 1) x' W^T + s scaling B A x' with s = magnitude / dora_norm() per output
        # row and x' = dropout(x) (x' W^T is y when nothing is dropped). s stays fp32 until the sum is cast back, as in
        # PEFT: in bf16 a magnitude change under 0.4% of a row would round away.
        scale = self.magnitude / self.dora_norm()
        base = y if dropped is x else self.base(dropped)
        return (y + ((scale - 1) * base + scale * F.linear(a, self.lora_B.weight) * self.scaling)).to(y.dtype)

    def base(self, x):
        """x W^T; a row-parallel layer (x: this rank's input columns) sums its partial products over the TP group."""
        if self.parallel == "row":
            return self.par.exit_tp_region(F.linear(x, self.weight))
        return F.linear(x if self.par is None else self.par.enter_tp_region(x), self.weight)

    def dropout(self, x):
        """Inverted dropout with the keep mask drawn as uniform >= p: torch's dropout distribution at a
        lower cost on CPU (bench/train_bench.py)."""
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p_tensor
        return x * keep * (1 / (1 - self.p))


class Attention(nn.Module):
    def __init__(self, arch, dtype, par, rows):
        super().__init__()
        hd, q_full, kv_full = arch.head_dim, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
        self.head_dim, self.heads = hd, len(rows["o_proj"]) // hd
        self.kv_heads = (len(rows["qkv_proj"]) - len(rows["o_proj"])) // (2 * hd)
        self.sizes = [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd]
        self.qkv_proj = LoRALinear((q_full + 2 * kv_full, arch.hidden), dtype, par, "column", rows["qkv_proj"])
        self.o_proj = LoRALinear((arch.hidden, q_full), dtype, par, "row", rows["o_proj"])
        self.qkv_proj.kv_rows_from = self.sizes[0]

    def forward(self, x, cos, sin, mask, cache=None, spans=None):
        b, s, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = rotate(q.view(b, s, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:  # generation: the keys and values of the positions before, then these
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache.update(k=k, v=v)
        gqa = self.heads != self.kv_heads
        if spans is None:  # no mask: plain causal attention (model.attention=causal, one document per row)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        else:  # each block of queries against only the keys its documents can reach

            def attend(i, j):  # the queries i against the keys j
                return F.scaled_dot_product_attention(
                    q[:, :, i], k[:, :, j], v[:, :, j], attn_mask=mask[:, :, i, j], enable_gqa=gqa
                )

            y = torch.cat([attend(slice(q0, q1), slice(k0, q1)) for q0, q1, k0 in spans], dim=2)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, arch, dtype, par, rows):
        super().__init__()
        inter = arch.inter
        self.gate_up_proj = LoRALinear((2 * inter, arch.hidden), dtype, par, "column", rows["gate_up_proj"])
        self.down_proj = LoRALinear((arch.hidden, inter), dtype, par, "row", rows["down_proj"])

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, arch, dtype, par, rows):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden, arch.eps, dtype)
        self.self_attn = Attention(arch, dtype, par, rows)
        self.post_attention_layernorm = RMSNorm(arch.hidden, arch.eps, dtype)
        self.mlp = MLP(arch, dtype, par, rows)

    def forward(self, x, cos, sin, mask, cache=None, spans=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, spans)
        return x + self.mlp(self.post_attention_layernorm(x))


class VocabEmbedding(nn.Module):
    """Embedding split by vocabulary over the TP group, each rank's lookups summed. Built uninitialised (the checkpoint
    fills it): no random numbers are drawn before LoRA's initialisation."""

    def __init__(self, arch, dtype, par):
        super().__init__()
        self.par, self.rows = par, arch.vocab // par.tp
        # The first row as a one-element tensor, not a Python int: on XLA the graph then takes it as an input and
        # every rank runs the same graph (an int, or a 0-d tensor holding 0, would be baked in as a constant).
        self.register_buffer("start", torch.tensor([par.tp_rank * self.rows]), persistent=False)
        self.weight = nn.Parameter(torch.empty(self.rows, arch.hidden, dtype=dtype), requires_grad=False)

    def forward(self, ids):
        if self.par.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.clamp(0, self.rows - 1), self.weight).masked_fill(outside[..., None], 0)
        return self.par.exit_tp_region(x)


class Llama(nn.Module):
    """Llama decoder named as the NxDT checkpoint (qkv_proj, gate_up_proj fused). With TP > 1 it holds one rank's shard:
    column-parallel qkv/gate_up, row-parallel o/down, vocabulary-parallel embedding and output layer."""

    def __init__(self, arch, dtype=torch.float32, par=None, recompute_layers=0):
        super().__init__()
        self.arch, self.par = arch, par or Parallel(Layout(arch), torch.device("cpu"), world=1)
        self.recompute_layers = recompute_layers  # the first N layers recompute their activations in backward
        self.attention, self.fixed_shapes = "masked", False  # set for training by attention_mode, compiles_per_shape
        self.neftune_alpha = None  # set for training from model_alignment_strategy.sft.neftune_noise_alpha
        rows = layout_rows(self.par.layout, self.par.tp_rank)
        self.model = nn.ModuleDict(  # the checkpoint's model.* names
            dict(
                embed_tokens=VocabEmbedding(arch, dtype, self.par),
                layers=nn.ModuleList(Block(arch, dtype, self.par, rows) for _ in range(arch.layers)),
                norm=RMSNorm(arch.hidden, arch.eps, dtype),
            )
        )
        self.lm_head = (
            None if arch.tie else LoRALinear((arch.vocab, arch.hidden), dtype, self.par, "column", rows["lm_head"])
        )
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    def forward(self, input_ids, position_ids, mask, caches=None, spans=None, lengths=None):
        """Final hidden states [b, s, hidden]. `mask`: boolean [b, 1, s, keys], or None (plain causal); `spans`
        (attention_spans): each query block's reachable keys; `lengths` [b]: real positions (NEFTune)."""
        x = self.model.embed_tokens(input_ids)
        if self.neftune_alpha and self.training:
            x = neftune(x, self.neftune_alpha, lengths)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            if i < self.recompute_layers and self.training and torch.is_grad_enabled():
                x = recomputed(layer, x, cos, sin, mask, spans)
            elif caches is not None:  # generation: a new length every token, so never a compiled layer
                x = layer.forward(x, cos, sin, mask, caches[i], spans)
            else:
                x = layer(x, cos, sin, mask, None, spans)
        return self.model.norm(x)

    def logits(self, hidden):
        """This rank's vocabulary slice of the logits."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.par.enter_tp_region(hidden), weight)


def neftune(x, alpha, lengths=None):
    """NEFTune: x [b, s, d] plus uniform noise in [-m, m], m = alpha / sqrt(L x d), L a row's real positions (`lengths`,
    or s), as transformers' hook adds it to the unpadded row (training only), so alike whether a device trims padding or
    not. From the device generator, which a replica's TP ranks share."""
    if lengths is None:
        lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    magnitude = alpha / (lengths.float() * x.shape[2]).sqrt()[:, None, None]
    return x + ((torch.rand_like(x, dtype=torch.float32) * 2 - 1) * magnitude).to(x.dtype)


def attention_spans(segment_ids, block):
    """[(q0, q1, k0)]: query blocks of `block` positions and the first key any of a block's queries may see (its first
    query's document start, in any row): attending k0..q1 equals the whole row. From CPU segment ids."""
    b, s = segment_ids.shape
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(change, torch.arange(s).expand(b, s), 0).cummax(dim=1).values
    return [(q0, min(q0 + block, s), int(run_start[:, q0].min())) for q0 in range(0, s, block)]


def document_mask(segment_ids):
    """Block-diagonal causal mask: a token sees earlier tokens of its own document only (padding = its own)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :]) & causal


# ------------------------------------------------------------------------------------------------ base weights
def base_weight_slots(model, fuse_qkv):
    """{NxDT tensor name: the model tensor (or row slice of it) that the checkpoint tensor fills}, before LoRA is
    added: the module names are the checkpoint's, the fused q|k|v weight stored whole (fuse_qkv) or in three parts."""
    slots = {}
    for name, weight in model.named_parameters():
        if name.endswith(".qkv_proj.weight"):
            sizes = model.get_submodule(name.removesuffix(".qkv_proj.weight")).sizes
            parts = {"qkv": weight} if fuse_qkv else dict(zip("qkv", weight.split(sizes, dim=0)))
            slots.update({f"{name}_{k}": t for k, t in parts.items()})
        else:
            slots[name] = weight
    return slots


def shard_layout(c):
    """The layout settings that 03's manifest must show for this run's shards."""
    return {k: c[f"distributed_strategy.{k}"] for k in ("tensor_model_parallel_size", "kv_replicator", "hw_backend")}


def load_base_weights(model, base_dir, fuse_qkv, wanted=None):
    """Fill every base tensor from this rank's NxDT shard; any missing, extra or misshapen tensor is an error.
    Returns the shard's path and the dtypes found in it."""
    wanted = dict(wanted or {"tensor_model_parallel_size": 1}, pipeline_model_parallel_size=1, fuse_qkv=fuse_qkv)
    path = Path(base_dir) / "model" / f"dp_rank_00_tp_rank_{model.par.tp_rank:02d}_pp_rank_00.pt"  # NxD's name, PP 0
    if not path.exists():
        raise StageError(
            f"exp_manager.resume_from_checkpoint: {path} not found (stage 03 writes it with "
            f"tensor_model_parallel_size {wanted['tensor_model_parallel_size']})"
        )
    manifest = Path(base_dir) / "manifest.json"  # stage 03's (NxD's own converter writes none)
    if manifest.exists():
        m = json.loads(manifest.read_text())
        for key, value in wanted.items():
            if m["settings"][key] != value:
                raise StageError(
                    f"{base_dir}: converted with {key} = {m['settings'][key]}, this run needs {value} (stage 03)"
                )
        expected = m["files"][f"model/{path.name}"]["bytes"]
        if path.stat().st_size != expected:
            raise StageError(f"{path}: {path.stat().st_size} bytes, manifest.json says {expected} (truncated?)")
    state = load_torch_file(path)
    slots = base_weight_slots(model, fuse_qkv)
    missing = [n for n in slots if n not in state]
    extra = [n for n in state if n not in slots]
    if missing:
        hint = " (is model.fuse_qkv the same as when converting?)" if "qkv_proj" in missing[0] else ""
        raise StageError(f"{path}: missing tensor '{missing[0]}'{hint} ({len(missing)} missing in all)")
    if extra:
        raise StageError(f"{path}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected in all)")
    with torch.no_grad():
        for name, dest in slots.items():
            src = state[name]
            if tuple(src.shape) != tuple(dest.shape):
                raise StageError(
                    f"{path}: tensor '{name}' has shape {list(src.shape)}, expected "
                    f"{list(dest.shape)} from model.model_config and the parallel layout"
                )
            if not dest.is_meta:
                dest.copy_(src)
    return path, {t.dtype for t in state.values()}


# ------------------------------------------------------------------------------------------------ LoRA
def lora_modules(model, targets):
    """(qualified name, LoRALinear) for every projection whose name is a configured target."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and n.rsplit(".", 1)[-1] in targets]


def add_lora(model, c, verbose=True):
    peft = "model_alignment_strategy.peft."
    modules = lora_modules(model, c[peft + "target_modules"])
    for _, m in modules:
        m.init_lora(*(c[peft + k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")))
    params = [p for _, m in modules for p in lora_parameters(m)]
    if not verbose:
        return modules, params
    if c[peft + "lora_bias"] != "none":
        # Llama 3 has no bias tensors (the config check refuses biased models), so nothing more trains.
        print(f"lora_bias={c[peft + 'lora_bias']}: the model has no bias tensors; only LoRA weights train")
    dora = c[peft + "use_dora"]
    trainable = sum(m.lora_A.weight.shape[0] * (m.full[0] + m.full[1]) + dora * m.full[0] for _, m in modules)
    total = trainable + sum(m.full[0] * m.full[1] for m in model.modules() if isinstance(m, LoRALinear))
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    total += model.arch.vocab * model.arch.hidden + norms
    if c[peft + "lora_verbose"]:
        print(f"  {'module':<44} {'A (full)':>14} {'B (full)':>14} {'params':>10}   split")
        for name, m in modules:
            r = m.lora_A.weight.shape[0]
            print(
                f"  {name:<44} {str([r, m.full[1]]):>14} {str([m.full[0], r]):>14} {r * (m.full[0] + m.full[1]):>10,}"
                f"   {'column (B split)' if m.parallel == 'column' else 'row (A split)'}"
            )
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return modules, params


def lora_parameters(m):
    """What trains in one adapted layer, in a fixed order: A, B, and with DoRA its magnitude."""
    return (m.lora_A.weight, m.lora_B.weight, *([] if m.magnitude is None else [m.magnitude]))


def lora_factors(m):
    """A, and B with DoRA's magnitude as one more column: the magnitude is split and replicated exactly as B's
    rows are, so the pair travels and is reassembled as plain LoRA's."""
    b = m.lora_B.weight
    return m.lora_A.weight, b if m.magnitude is None else torch.cat([b, m.magnitude[:, None]], 1)


def sync_gradients(modules, params, par):
    """The full LoRA gradients everywhere: copied K/V rows of qkv_proj's B, each seeing only its rank's Q heads, are
    summed over their KV group; data-parallel ranks sum theirs (losses are over the step's global tokens)."""
    if par.size("kv") > 1:
        for _, m in modules:
            if m.kv_rows_from is not None:
                for g in [m.lora_B.weight.grad] + ([] if m.magnitude is None else [m.magnitude.grad]):
                    g[m.kv_rows_from :] = par.all_reduce(g[m.kv_rows_from :], "kv")
    if par.dp > 1:
        grads = [p.grad for p in params]
        flat = par.all_reduce(torch.cat([g.flatten() for g in grads]), "dp")
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))


def global_grad_norm(modules, par):
    """L2 norm of the whole, unsharded LoRA gradient: each rank adds the squares of what it holds, a tensor
    held in several copies counting once (divided by its number of copies), and the TP group sums."""
    total = 0.0
    for _, m in modules:
        a, b = m.lora_A.weight.grad.float(), m.lora_B.weight.grad.float()
        if m.magnitude is not None:  # held like B's rows
            b = torch.cat([b, m.magnitude.grad.float()[:, None]], 1)
        if m.parallel == "row":  # A split, B replicated
            total = total + a.square().sum() + b.square().sum() / par.tp
            continue
        own = m.kv_rows_from if m.kv_rows_from is not None else b.shape[0]
        total = total + a.square().sum() / par.tp + b[:own].square().sum() + b[own:].square().sum() / par.size("kv")
    return par.all_reduce(total, "tp").sqrt()


def nonfinite(x):
    """True if any element of x is NaN or infinite: x - x is NaN exactly there. (torch.isfinite is lowered by
    torch-xla with a float64 constant, and NeuronCores have no float64.)"""
    d = x - x
    return (d != d).any()


def gather_lora(modules, par):
    """{module name: (A, B)} at full size (lora_factors: with DoRA, B's last column is the magnitude) from every
    tensor-parallel rank's shard, as one flat float32 vector: one gather, one transfer, the same graph everywhere."""
    flat = torch.cat([t.detach().float().flatten() for _, m in modules for t in lora_factors(m)])
    rows = [layout_rows(par.layout, r) for r in range(par.tp)]
    return assemble_lora(modules, torch.stack(par.all_gather(flat, "tp")).cpu(), rows)


def assemble_lora(modules, everyone, rows):
    """The full LoRA tensors from the gathered flat vectors `everyone` [TP ranks, n] and each rank's rows (layout_rows).
    Replicated copies (column-parallel A, row-parallel B, copied K/V rows) must be equal, never averaged."""
    tensors = [t for _, m in modules for t in lora_factors(m)]
    tp = everyone.shape[0]
    parts = iter(x.reshape(tp, *t.shape) for x, t in zip(everyone.split([t.numel() for t in tensors], 1), tensors))
    out = {}
    for name, m in modules:
        a_all, b_all = next(parts), next(parts)
        leaf = name.rsplit(".", 1)[-1]
        # The replicated factor, and the split one with its split dimension first.
        rep_all, split_all = (a_all, b_all) if m.parallel == "column" else (b_all, a_all.transpose(1, 2))
        n = m.full[0] if m.parallel == "column" else m.full[1]
        full, seen = torch.zeros(n, split_all.shape[2]), torch.zeros(n, dtype=torch.bool)
        for r in range(tp):
            part, idx = split_all[r], rows[r][leaf]
            check_copies(name, r, rep_all[r], rep_all[0])
            check_copies(name, r, part[seen[idx]], full[idx][seen[idx]])
            full[idx], seen[idx] = part, True
        rep = rep_all[0].clone()
        out[name] = (rep, full) if m.parallel == "column" else (full.t().contiguous(), rep)
    return out


def check_copies(name, rank, copy, first):
    """Replicated LoRA values must be bitwise equal on every rank that holds them (compared as bits, so that
    identical NaNs of a diverged run count as equal)."""
    differ = copy.view(torch.int32) != first.view(torch.int32)
    if differ.any():
        largest = float((copy - first).abs().max())
        raise StageError(
            f"LoRA weights of {name}: tensor-parallel rank {rank} holds a replicated copy that differs from the first "
            f"one in {int(differ.sum())} of {differ.numel()} values (largest difference {largest:.3g}); it must be "
            f"identical, so the parallel layout or the gradient synchronisation is wrong"
        )


def peft_tensors(lora, sizes, dora):
    """Our LoRA weights (gather_lora) under PEFT's names: fused q|k|v and gate|up become separate adapters sharing A;
    B's rows, and with DoRA the magnitudes (B's last column), are split between them."""
    out = {}
    for name, (a, rows) in lora.items():
        parent, leaf = name.rsplit(".", 1)
        if leaf == "qkv_proj":
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), rows.split(sizes)))
        elif leaf == "gate_up_proj":
            parts = dict(zip(("gate_proj", "up_proj"), rows.chunk(2)))
        else:
            parts = {leaf: rows}
        for hf_leaf, part in parts.items():
            prefix = f"base_model.model.{parent}.{hf_leaf}"
            out[f"{prefix}.lora_A.weight"] = a.clone().contiguous()
            out[f"{prefix}.lora_B.weight"] = (part[:, :-1] if dora else part).clone().contiguous()
            if dora:
                out[f"{prefix}.lora_magnitude_vector"] = part[:, -1].clone().contiguous()
    return out


def export_peft_adapter(lora, arch, c, out_dir):
    """Write adapter_model.safetensors, then adapter_config.json, which marks the adapter complete (resume_point),
    each under a temporary name and renamed: only these two files are ever replaced, anything else there stays."""
    kv, peft = arch.kv_heads * arch.head_dim, "model_alignment_strategy.peft."
    tensors = peft_tensors(lora, [arch.heads * arch.head_dim, kv, kv], c[peft + "use_dora"])
    hf_targets = sorted({k.split(".")[-3] for k in tensors if k.endswith(".lora_A.weight")})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=c[peft + "lora_rank"], bias=c[peft + "lora_bias"])
    config.update({k: c[peft + k] for k in ("lora_alpha", "lora_dropout", "use_rslora", "use_dora")})
    config.update(target_modules=hf_targets, fan_in_fan_out=False, inference_mode=True)
    config["base_model_name_or_path"] = c["model.hf_weights_dir"]
    weights, text = Path(out_dir) / "adapter_model.safetensors", json.dumps(config, indent=2) + "\n"
    check_own_adapter(out_dir)
    weights.parent.mkdir(parents=True, exist_ok=True)
    mark = {"format": "pt", "written_by": STAGE, "config_sha256": hashlib.sha256(text.encode()).hexdigest()}
    save_file(tensors, f"{weights}.tmp", metadata=mark)
    os.replace(f"{weights}.tmp", weights)
    write_atomically(weights.parent / "adapter_config.json", text)
    return weights.parent


def check_own_adapter(out_dir):
    """Adapter files are replaced only where this stage exported them: its weights name it and the sha256 of the
    config written with them. Any other, or an edited config, stops the stage and stays as it is."""
    weights, settings = Path(out_dir) / "adapter_model.safetensors", Path(out_dir) / "adapter_config.json"
    mark = {}
    with contextlib.suppress(Exception), safe_open(weights, "pt") as f:
        mark = f.metadata() or {}
    same = not settings.exists() or file_sha256(settings) == mark.get("config_sha256")
    if (weights.exists() or settings.exists()) and not (mark.get("written_by") == STAGE and same):
        refuse_foreign(out_dir, "adapter export", "adapter files this stage did not export, or edited since")


# ------------------------------------------------------------------------------------------------ data
# Each split is tokenized, masked and packed once into flat files that every rank memory-maps (plain numpy, as
# nanoGPT's .bin files: nothing beyond dtype and length): tokens.bin (int32 ids of the kept documents, end to end in
# file order), trained.bin (uint8: the token is a target of the one before it), doc_starts.npy and doc_supervised.npy
# per document, window_starts.npy (a window is a run of consecutive documents) and prepared.json (inputs, summary).
# The directory is named by a hash of all that changes them: changed inputs prepare anew, the same ones are reused.
PREPARED_FORMAT = 3  # raise when the prepared files change meaning: older directories are then prepared anew
CHUNK_RECORDS = 2048  # records per tokenizer call: enough for the tokenizer's threads, little memory
PREPARE_TIMEOUT_S = 6 * 3600  # how long the other processes wait for a split's preparation


# The tokenizer's own files (a tokenizer directory may be the model's, whose weights say nothing about tokens).
TOKENIZER_FILE = re.compile(
    r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template.*|vocab.*|merges\.txt"
)
PREPARED_FILES = {
    "tokens.bin",
    "trained.bin",
    "doc_starts.npy",
    "doc_supervised.npy",
    "window_starts.npy",
    "prepared.json",
}
PREPARED_NAME = re.compile(r"[0-9a-f]{20}(\.tmp-.+)?")  # what <file>.prepared/ holds: prepared keys, unfinished ones


def load_tokenizer(c):
    from transformers import AutoTokenizer

    tok_dir = Path(c["data.tokenizer.type"])
    if not tok_dir.is_dir():
        raise StageError(f"data.tokenizer.type: tokenizer directory {tok_dir} not found (stage 02 writes it)")
    if not (tok_dir / "tokenizer.json").is_file():
        raise StageError(
            f"data.tokenizer.type: {tok_dir} has no tokenizer.json (the fast tokenizer's file, which "
            f"stage 02 writes); run stage 02 or point the key at a directory that has one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as e:
        raise StageError(
            f"data.tokenizer.type: {tok_dir} cannot be loaded ({type(e).__name__}: {first_line(e)})"
        ) from None
    if tokenizer.eos_token_id is None:
        raise StageError(f"data.tokenizer.type: {tok_dir} defines no EOS token, which ends every trained answer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only fills padding, which is never attended or trained
    return tokenizer


# The fields of the record formats that stage 01 converts from: beside 01's {input, output} they mean the record was
# not normalized (an Alpaca record holds instruction, input and output), so 05 refuses it rather than guess.
UNNORMALIZED_FIELDS = {"instruction", "context", "response", "prompt", "completion", "conversations", "system"}


def check_data_file(path, name):
    """Refuse, before any work, a data file that is not the JSON lines stage 01 writes, with the command that
    writes it: 05 trains on 01's normalized records only, so every file kind and format is read in one place."""
    path = Path(path)
    if not path.exists() and "://" not in str(path):
        raise StageError(f"data file {path} not found (stage 01 writes it)")
    kind = "a directory" if path.is_dir() else None if path.is_file() else "a remote source"
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        kind = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
        kind = kind or ("gzip-compressed" if head[:2] == b"\x1f\x8b" else "a JSON array" if head[:1] == b"[" else None)
    if kind is not None:
        raise StageError(f"{path}: {kind}, not JSON lines; {normalize_with_01(path, name)}")


def normalize_with_01(path, name):
    """The advice for data that 05 does not read: the stage 01 command that writes it as 05 reads it."""
    out = Path(path).parent / f"{Path(path).name.split('.')[0]}.normalized.jsonl"
    return (
        f"05 trains on the JSON lines of {{input, output}} or {{messages}} records that stage 01 writes, so "
        f"normalize the data with it first: python 01_download_data.py --config config.yaml "
        f"data.download.{name}_uri={path} data.{name}_dir={out}, then data.{name}_dir={out} here"
    )


def training_record(row):
    """(prompt, response) of an {input, output} record, or the checked {messages, tools} of a conversation: the two
    shapes 01 writes (other fields, kept by 01, are ignored). BadRecord for anything else."""
    shape = {"input", "output", "messages"} & set(row)
    if shape == {"messages"} and not UNNORMALIZED_FIELDS & set(row):
        return check_conversation(row["messages"], row.get("tools"))
    if shape == {"input", "output"} and not UNNORMALIZED_FIELDS & set(row):
        prompt, response = row["input"], row["output"]
        if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
            return prompt, response
        raise BadRecord("bad record", "'input' and 'output' must be non-empty strings")
    raise BadRecord("not normalized", f"fields {sorted(row)} are neither {{input, output}} nor {{messages}}")


def record_chunks(path, name, limit, tally=None, size=CHUNK_RECORDS):
    """Lists of up to `size` (line number, record) pairs streamed from a file of normalized records (training_record),
    the first `limit`; a bad line stops the stage. `tally["in_file"]` counts all the file's records."""
    chunk, n, total = [], 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            if limit is not None and n >= limit:
                continue
            try:
                chunk.append((lineno, training_record(parse_row(line))))
            except BadRecord as bad:
                raise StageError(f"{path}:{lineno}: {bad.reason}; {normalize_with_01(path, name)}") from None
            n += 1
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
    if n == 0:
        raise StageError(f"{path}: no records")
    if tally is not None:
        tally["in_file"] += total


def read_records(path, name, limit):
    """The records of a data file, as a list (generation prompts take the first few)."""
    return [record for chunk in record_chunks(path, name, limit) for _, record in chunk]


def prompt_ids(tokenizer, fmt, prompts):
    """Token ids of each single-turn prompt as the model sees it before its answer, in one tokenizer call."""
    if fmt == "raw":
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [bos + ids for ids in as_ids(tokenizer(prompts, add_special_tokens=False, return_attention_mask=False))]
    users = [[{"role": "user", "content": p}] for p in prompts]
    return [list(x) for x in as_ids(tokenizer.apply_chat_template(users, add_generation_prompt=True, tokenize=True))]


def as_ids(encoded):
    """The token ids of a tokenizer's output (a BatchEncoding, or ids already)."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def encode_batch(tokenizer, fmt, records, labels, train_reasoning=True):
    """The documents [(token ids, trained spans)] of each record, each kind tokenized for the batch at once. Raw
    single-turn: [BOS] + input | output + [EOS], the output trained; the rest through encode_conversations."""
    out = [None] * len(records)
    raw = [i for i, r in enumerate(records) if isinstance(r, tuple) and fmt == "raw"]
    if raw:
        prompts = prompt_ids(tokenizer, "raw", [records[i][0] for i in raw])
        answers = as_ids(tokenizer([records[i][1] for i in raw], add_special_tokens=False, return_attention_mask=False))
        for i, p, r in zip(raw, prompts, answers):
            out[i] = [(p + r + [tokenizer.eos_token_id], [(len(p), len(p) + len(r) + 1)])]
    chats = [i for i in range(len(records)) if out[i] is None]
    if chats:
        # a conversation is {messages, tools} (training_record's) or its messages; a single-turn record user + assistant
        conversations = [records[i] if isinstance(records[i], dict) else {"messages": records[i]} for i in chats]
        for conv in (c for c in conversations if isinstance(c["messages"], tuple)):
            conv["messages"] = [
                dict(role=role, content=text) for role, text in zip(("user", "assistant"), conv["messages"])
            ]
        labels = [labels[i] for i in chats]
        for i, docs in zip(chats, encode_conversations(tokenizer, conversations, labels, train_reasoning)):
            out[i] = docs
    return out


def encode_conversations(tokenizer, conversations, labels, train_reasoning=True):
    """The documents [(token ids, trained spans)] of each conversation (conversation_texts), tokenized once, the spans
    read from the character alignment; a boundary inside a token is checked with the prefixes tokenized alone."""
    docs = conversation_texts(tokenizer, conversations, labels, train_reasoning)
    encoded = tokenizer([text for _, text, _ in docs], add_special_tokens=False, return_attention_mask=False)
    out = [[] for _ in conversations]
    for d, (n, text, bounds) in enumerate(docs):
        ids, spans = encoded["input_ids"][d], []
        for chars in bounds:
            span = [token_boundary(encoded, d, char, len(text)) for char in chars]
            if None in span:  # the text boundary falls inside a token: compare the prefixes' own tokens
                own = tokenizer([text[:char] for char in chars], add_special_tokens=False)["input_ids"]
                if any(list(ids[: len(prefix)]) != list(prefix) for prefix in own):
                    raise StageError(f"{labels[n]}: a conversation prefix does not tokenize as a prefix of the whole")
                span = [len(prefix) for prefix in own]
            spans.append(tuple(span))
        out[n].append((list(ids), spans))
    return out


def conversation_texts(tokenizer, conversations, labels, train_reasoning):
    """(conversation index, text, trained character spans) of each document the conversations train as, rendered with
    the chat template and their tools. Spans come from successive prefixes: an assistant turn trains from the end of the
    conversation before it, rendered with the generation prompt, to the end of the conversation through it (reasoning,
    content or tool calls, end-of-turn tokens); system, user and tool text, tools and role headers do not, nor, without
    data.train_reasoning, the turn's reasoning. A turn the template renders otherwise once others follow (Qwen3's drops
    earlier reasoning) trains in a document of its own: the conversation through it, as the model sees it when writing
    it."""
    if not tokenizer.chat_template:
        raise StageError(
            f"{labels[0]}: a conversation (or data.prompt_format=chat_template) is rendered with the "
            f"tokenizer's chat template, and the tokenizer in data.tokenizer.type has none"
        )
    plain, tools = template_input(tokenizer, conversations, labels)
    trained = [[m["role"] == "assistant" and m.get("train", True) for m in conv["messages"]] for conv in conversations]
    turns = [(n, i) for n, flags in enumerate(trained) for i, flag in enumerate(flags) if flag]
    # A conversation that ends on a trained answer renders whole as the prefix through that answer: not twice.
    last = {n: k for k, (n, i) in enumerate(turns) if i == len(plain[n]) - 1}
    rest = [(n, len(plain[n])) for n in range(len(plain)) if n not in last]

    def render(prefixes, prompt):  # conversation n through message i - 1, for each (n, i), with its tools
        return render_chats(tokenizer, [plain[n][:i] for n, i in prefixes], prompt, [tools[n] for n, _ in prefixes])

    try:
        starts, ends = render(turns, True), render([(n, i + 1) for n, i in turns], False)
        others = dict(zip([n for n, _ in rest], render(rest, False)))
    except Exception:  # a template may refuse a conversation (roles out of order, ...): name the first one
        for n, conversation in enumerate(plain):
            try:
                tokenizer.apply_chat_template(conversation, tools=tools[n], tokenize=False)
            except Exception as e:
                raise StageError(
                    f"{labels[n]}: the tokenizer's chat template refuses this conversation "
                    f"({type(e).__name__}: {first_line(e)}); the template of {tokenizer.name_or_path}"
                ) from None
        raise
    fulls = [ends[last[n]] if n in last else others[n] for n in range(len(plain))]
    own, whole = [], [[] for _ in plain]
    for (n, i), start, end in zip(turns, starts, ends):
        if not end.startswith(start):
            raise StageError(
                f"{labels[n]}: the tokenizer's chat template does not render the conversation up to "
                f"message {i + 1} as a prefix of the conversation through it, so its trained turn cannot be found"
            )
        first, reasoning = len(start), conversations[n]["messages"][i].get("reasoning_content", "").strip()
        if reasoning and not train_reasoning:
            first = end.find(reasoning, first) + len(reasoning)
            if first < len(reasoning):
                raise StageError(
                    f"{labels[n]}: message {i + 1}'s reasoning is not in the text as written (train_reasoning)"
                )
        if fulls[n].startswith(end):
            whole[n].append((first, len(end)))
        else:
            own.append((n, end, [(first, len(end))]))
    for n, conv in enumerate(conversations):  # a tool result as written, or as a JSON string (Llama 3.1's template)
        for k, m in enumerate(conv["messages"], 1):
            shown = m["role"] != "tool" or m["content"].strip() in fulls[n]
            if not (shown or json.dumps(m["content"], ensure_ascii=False)[1:-1] in fulls[n]):
                raise StageError(
                    f"{labels[n]}: the chat template of {tokenizer.name_or_path} drops the tool result, message {k}"
                )
    return own + [(n, fulls[n], spans) for n, spans in enumerate(whole) if spans]


def template_input(tokenizer, conversations, labels):
    """Each conversation's messages and tools as the template reads them: "train" left out, reasoning also as `thinking`
    (as transformers does). Tools, calls or reasoning a template never reads are refused."""
    plain, tools = [], []  # what a template must read to render each (the tools variable, message keys):
    reads = {"tools": r"\btools\b", "tool_calls": "tool_calls", "reasoning_content": "reasoning_content|thinking"}
    for n, conv in enumerate(conversations):
        source, messages = tokenizer.get_chat_template(tools=conv.get("tools")), conv["messages"]
        found = {k for m in messages for k in m} | ({"tools"} if conv.get("tools") else set())
        missing = [k for k, read in reads.items() if k in found and not re.search(read, source)]
        if missing:
            raise StageError(
                f"{labels[n]}: this conversation has {missing[0]}, which the chat template of "
                f"{tokenizer.name_or_path} never reads: it would train without them; use a tokenizer whose "
                f"template renders them (data.tokenizer.type)"
            )
        thinking = [{"thinking": m["reasoning_content"]} if "reasoning_content" in m else {} for m in messages]
        plain.append([{k: v for k, v in m.items() if k != "train"} | t for m, t in zip(messages, thinking)])
        tools.append(conv.get("tools"))
    return plain, tools


def render_chats(tokenizer, conversations, generation_prompt, tools=None):
    """What tokenizer.apply_chat_template(conversation, tools=..., tokenize=False) renders, by its compiled template
    directly where possible (its per-message copies cost more) if a first conversation agrees."""
    if not conversations:
        return []
    tools, options = tools or [None] * len(conversations), dict(tokenize=False, add_generation_prompt=generation_prompt)

    def public(n):  # the first n conversations, in one call where none has tools
        if all(t is None for t in tools[:n]):
            return tokenizer.apply_chat_template(conversations[:n], **options)
        return [tokenizer.apply_chat_template(m, tools=t, **options) for m, t in zip(conversations[:n], tools)]

    try:  # (a dict of templates, one for tools and one without, is chosen per conversation: public only)
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.chat_template)
    except Exception:
        return public(len(conversations))
    context = dict(tokenizer.special_tokens_map, documents=None, add_generation_prompt=generation_prompt)
    texts = [template.render(messages=m, tools=t, **context) for m, t in zip(conversations, tools)]
    return texts if texts[0] == public(1)[0] else public(len(conversations))


def token_boundary(encoded, n, char, length):
    """The index of the token of text n that starts at its character `char` (its length: the end), or None when a
    token straddles that position; read from the fast tokenizer's alignment, not from per-token offset lists."""
    if char == length:
        return len(encoded["input_ids"][n])
    k = encoded.char_to_token(n, char)
    return k if k is not None and encoded.token_to_chars(n, k).start == char else None


def tokenize(records, tokenizer, fmt, seq_len, truncation, labels=None, train_reasoning=True):
    """(ids, labels) per document (encode_batch), -100 outside trained spans. Over seq_len: dropped or truncated
    (counted); a conversation keeps its turns up to the last answer that fits, else prompt then answer are cut."""
    labels = labels or [f"record {i + 1}" for i in range(len(records))]
    encoded = encode_batch(tokenizer, fmt, records, labels, train_reasoning)
    docs, stats = [], {"records": len(records), "truncated": 0, "dropped": 0, "split": sum(len(d) > 1 for d in encoded)}
    for ids, spans in itertools.chain.from_iterable(encoded):
        if len(ids) > seq_len:
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            ids, spans = truncated(ids, spans, seq_len)
        targets = [-100] * len(ids)
        for start, end in spans:
            targets[start:end] = ids[start:end]
        docs.append((ids, targets))
    return docs, stats


def truncated(ids, spans, seq_len):
    """A record cut to seq_len tokens, by the rule of tokenize()."""
    ends = [end for _, end in spans if end <= seq_len]
    if ends:
        return ids[: ends[-1]], [(s, e) for s, e in spans if e <= ends[-1]]
    start, end = spans[0]
    p, r = ids[:start], ids[start:end]
    p = p[: max(1, seq_len - len(r))]
    r = r[: seq_len - len(p)]
    return p + r, [(len(p), len(p) + len(r))]


def doc_arrays(docs):
    """Documents as flat arrays: ids (int32), trained flags (a token trains as the target of the one before it in its
    document, so never the first), and each document's length and trained tokens; in C loops, not Python ones."""
    lengths = np.fromiter((len(ids) for ids, _ in docs), np.int64, count=len(docs))
    total, firsts = int(lengths.sum()), np.cumsum(lengths) - lengths
    tokens = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in docs), np.int32, count=total)
    trained = np.fromiter(itertools.chain.from_iterable(labels for _, labels in docs), np.int32, count=total) != -100
    trained[firsts] = False
    return tokens, trained.astype(np.uint8), lengths, np.add.reduceat(trained, firsts, dtype=np.int64)


def pack(lengths, seq_len, packing):
    """Window boundaries as document indices [windows + 1]: greedily in file order, a window takes documents while
    they fit in seq_len tokens; without packing, one document per window. One Python step per document."""
    if not packing:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > seq_len:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.array(starts, dtype=np.int64)


class Windows:
    """The packed windows of one split over flat token arrays (memory-mapped when prepared on disk), tensors built when
    rows are drawn; small per-window counts (tokens, supervised, attention keys) are all a process keeps."""

    def __init__(self, tokens, trained, doc_starts, doc_supervised, starts, seq_len, pad_id):
        self.tokens, self.trained, self.doc_starts, self.starts = tokens, trained, doc_starts, starts
        self.seq_len, self.pad_id = seq_len, pad_id
        self.sources, self.mix = len(starts) - 1, None  # one source of this many windows, or a mixture (load_split)
        lengths = np.diff(doc_starts)
        self.n_tokens = np.diff(doc_starts[starts])
        self.supervised = np.add.reduceat(doc_supervised, starts[:-1])
        # keys attended per window: sum over its documents of 1 + 2 + ... + length (causal, within the document)
        self.keys = np.add.reduceat(lengths * (lengths + 1) // 2, starts[:-1])

    @classmethod
    def from_docs(cls, docs, seq_len, packing, pad_id):
        """In memory, from tokenize()'s documents."""
        tokens, trained, lengths, supervised = doc_arrays(docs)
        doc_starts = np.concatenate([[0], np.cumsum(lengths)])
        return cls(tokens, trained, doc_starts, supervised, pack(lengths, seq_len, packing), seq_len, pad_id)

    @classmethod
    def open(cls, where, pad_id):
        """Prepared on disk: the token arrays memory-mapped, so every rank shares one copy in the page cache."""
        meta = json.loads((where / "prepared.json").read_text())
        tokens = np.memmap(where / "tokens.bin", dtype=np.int32, mode="r")
        trained = np.memmap(where / "trained.bin", dtype=np.uint8, mode="r")
        counts = [np.load(where / f"{name}.npy") for name in ("doc_starts", "doc_supervised", "window_starts")]
        windows = cls(tokens, trained, *counts, meta["inputs"]["seq_length"], pad_id)
        windows.inputs = meta["inputs"]  # the data and tokenizer checksums, which a resumed run compares
        return windows

    def __len__(self):
        return len(self.starts) - 1

    def batch(self, rows):
        """[len(rows), seq_len] tensors of these windows (-1: an empty row): targets shifted inside each document (no
        label crosses one), positions restarting per document, segment ids (0 = padding) for the mask."""
        n, s = len(rows), self.seq_len
        ids = np.full((n, s), self.pad_id, dtype=np.int64)
        targets = np.full((n, s), -100, dtype=np.int64)
        positions = np.tile(np.arange(s, dtype=np.int64), (n, 1))
        segments = np.zeros((n, s), dtype=np.int64)
        for i, w in enumerate(rows):
            if w < 0:
                continue
            bounds = self.doc_starts[self.starts[w] : self.starts[w + 1] + 1]
            first, end = int(bounds[0]), int(bounds[-1])
            lengths = np.diff(bounds)
            used = end - first
            seg = np.repeat(np.arange(1, len(lengths) + 1), lengths)
            ids[i, :used] = self.tokens[first:end]
            segments[i, :used] = seg
            positions[i, :used] = np.arange(used) - np.repeat(bounds[:-1] - first, lengths)
            positions[i, used:] = np.arange(s - used)
            nxt = self.tokens[first + 1 : end]
            keep = (self.trained[first + 1 : end] != 0) & (seg[1:] == seg[:-1])
            targets[i, : used - 1] = np.where(keep, nxt, -100)
        arrays = {"input_ids": ids, "targets": targets, "position_ids": positions, "segment_ids": segments}
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def prepared_location(path, tokenizer_dir, c):
    """Where a split (a file, or a list: several sources) is prepared, and its key's inputs: <data.cache_dir or the
    first file's directory>/<name>.prepared/<hash of data, tokenizer, format, window settings>."""
    tokenizer_files = [p for p in sorted(Path(tokenizer_dir).iterdir()) if TOKENIZER_FILE.fullmatch(p.name)]
    inputs = {
        "format": PREPARED_FORMAT,
        "data_sha256": [file_sha256(p) for p in path] if isinstance(path, list) else file_sha256(path),
        "tokenizer_sha256": {p.name: file_sha256(p) for p in tokenizer_files if p.is_file()},
        "packing": c["model_alignment_strategy.sft.packing"],
    }
    settings = ("prompt_format", "seq_length", "truncation", "train_reasoning", "dev_choose_samples")
    inputs.update({k: c[f"data.{k}"] for k in settings})
    key = text_sha256(inputs)[:20]
    first = Path(as_list(path)[0])
    return (Path(c["data.cache_dir"]) if c["data.cache_dir"] else first.parent) / f"{first.name}.prepared" / key, inputs


def text_sha256(value):
    """Hex sha256 of a JSON value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def prepare_split(path, tokenizer, c, name):
    """The prepared directory of a split: reused when one exists for these inputs, else made here, written
    under a temporary name and renamed when complete (a killed preparation is never taken for a finished one)."""
    for source in as_list(path):
        check_data_file(source, name)
    where, inputs = prepared_location(path, c["data.tokenizer.type"], c)
    root, key = where.parent, "data.cache_dir" if c["data.cache_dir"] else f"data.{name}_dir"
    if root.exists() and (not root.is_dir() or not all(PREPARED_NAME.fullmatch(p.name) for p in root.iterdir())):
        refuse_foreign(root, key, "it holds files other than prepared splits")
    if (where / "prepared.json").exists():
        return where
    print(f"{name}: preparing {path} into {where}", file=sys.stderr)
    tmp = where.with_name(f"{where.name}.tmp-{os.uname().nodename}-{os.getpid()}")
    try:
        made = make_dirs(root)
        for old in root.glob(f"{where.name}.tmp-{os.uname().nodename}-*"):  # this host's, whose process has gone
            try:
                os.kill(int(old.name.rsplit("-", 1)[1]), 0)
                gone = old == tmp  # this process's own name, left by an earlier process of the same id
            except ProcessLookupError:
                gone = True
            except (ValueError, PermissionError):
                gone = False
            if gone and old.is_dir() and all(f.name in PREPARED_FILES for f in old.iterdir()):  # nothing else there
                shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise StageError(
            f"{key}: cannot write the prepared data to {root} ({e.strerror or e}); set data.cache_dir"
        ) from None
    try:
        stats = write_prepared(path, tokenizer, c, name, tmp)
        meta = {"inputs": inputs, "source": [str(Path(p).resolve()) for p in as_list(path)], "stats": stats}
        (tmp / "prepared.json").write_text(json.dumps(meta, indent=1) + "\n")
        for f in tmp.iterdir():
            fsync_path(f)
        try:
            tmp.rename(where)
        except OSError:  # another launch sharing this filesystem finished the same preparation first
            if not (where / "prepared.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # a failed preparation leaves no empty directories behind
            for d in reversed(made):
                d.rmdir()
    return where


def write_prepared(path, tokenizer, c, name, out):
    """Tokenize, mask and pack a split into `out`, one tokenizer call per chunk appended to the token files; only
    document lengths stay in memory. Several sources go in turn, each in windows of its own (source_windows)."""
    seq_len, stats = c["data.seq_length"], dict.fromkeys(["records", "truncated", "dropped", "split", "in_file"], 0)
    lengths, supervised, ends, fmt, cut = [], [], [], c["data.prompt_format"], c["data.truncation"]
    bar = tqdm(total=c["data.dev_choose_samples"], desc=name, unit=" records", dynamic_ncols=True)
    with open(out / "tokens.bin", "wb") as tokens_f, open(out / "trained.bin", "wb") as trained_f:
        for source in as_list(path):
            for chunk in record_chunks(source, name, c["data.dev_choose_samples"], stats):
                records, labels = [r for _, r in chunk], [f"{source}:{where}" for where, _ in chunk]
                docs, chunk_stats = tokenize(records, tokenizer, fmt, seq_len, cut, labels, c["data.train_reasoning"])
                for k in chunk_stats:
                    stats[k] += chunk_stats[k]
                bar.update(len(records))
                if docs:
                    tokens, trained, n, n_trained = doc_arrays(docs)
                    tokens_f.write(tokens.tobytes())
                    trained_f.write(trained.tobytes())
                    lengths.append(n)
                    supervised.append(n_trained)
            ends.append(sum(map(len, lengths)))
            if ends[-1] == (ends[-2] if len(ends) > 1 else 0):
                raise StageError(f"{source}: every record is longer than data.seq_length={seq_len}")
    bar.close()
    lengths, supervised = np.concatenate(lengths), np.concatenate(supervised)
    packing = c["model_alignment_strategy.sft.packing"]
    parts = [pack(lengths[a:b], seq_len, packing)[:-1] + a for a, b in zip([0, *ends], ends)]
    starts = np.concatenate([*parts, [len(lengths)]])
    np.save(out / "doc_starts.npy", np.concatenate([[0], np.cumsum(lengths)]))
    np.save(out / "doc_supervised.npy", supervised)
    np.save(out / "window_starts.npy", starts)
    tokens, trained = int(lengths.sum()), int(supervised.sum())
    stats.update(windows=len(starts) - 1, tokens=tokens, supervised=trained, source_windows=[len(p) for p in parts])
    stats["fill"] = stats["tokens"] / (stats["windows"] * seq_len)
    return stats


def load_split(path, tokenizer, c, name, par):
    """A split's windows, prepared once per run: one process per host prepares (or finds) them while the others
    wait on the CPU group, then every process maps the same files. Prints the split's summary."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if par is not None and par.world > 1 else 0
    where = prepare_split(path, tokenizer, c, name) if local_rank == 0 else None
    if par is not None and par.world > 1:
        par.barrier(timeout_s=PREPARE_TIMEOUT_S)
        where = par.broadcast(where)
    stats = json.loads((where / "prepared.json").read_text())["stats"]
    total = stats["in_file"]
    read = f"{stats['records']} of {total}" if total != stats["records"] else f"{stats['records']}"
    print(
        f"{name}: {read} records -> {stats['windows']} windows of {c['data.seq_length']} "
        f"({stats['fill']:.1%} filled), {stats['supervised']:,} supervised of {stats['tokens']:,} tokens "
        f"({stats['supervised'] / max(stats['tokens'], 1):.1%}); "
        f"truncated {stats['truncated']}, dropped {stats['dropped']}"
        + (f"; {stats['split']} conversations as several documents" if stats.get("split") else "")
        + f"; prepared in {where}"
    )
    windows, sizes, weights = Windows.open(where, tokenizer.pad_token_id), stats["source_windows"], c["data.mix"]
    if (
        len(sizes) > 1
    ):  # an epoch holds as many windows as the sources, each one's share following data.mix (or its size)
        shares = [max(1, round(sum(sizes) * w / sum(weights or sizes))) for w in weights or sizes]
        windows.sources, windows.mix = tuple(zip(sizes, shares)), {}
        for source, n, k in zip(path, sizes, shares):  # a share above a source's windows repeats them
            windows.mix[str(source)] = {"windows": n, "per_epoch": k, "share": k / sum(shares)}
            again = f", each about {k / n:.2g} times" if k > n else ""
            print(f"train mix: {source}: {k:,} windows per epoch ({k / sum(shares):.1%}) from its {n:,}{again}")
    return windows


@functools.lru_cache(maxsize=4)
def epoch_order(sources, seed, epoch):
    """One epoch's window order, made once for its steps: a (seed, epoch) permutation of one source's windows
    (`sources`: their count) or of a mix's draw ((windows, share) each: sampled below the size, repeated above)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    if isinstance(sources, int):
        return torch.randperm(sources, generator=generator)
    drawn, offset = [], 0
    for n, share in sources:  # all of a source's windows, or its share of laps of permutations
        laps = (
            [torch.randperm(n, generator=generator) for _ in range(-(-share // n))] if share != n else [torch.arange(n)]
        )
        drawn, offset = drawn + [offset + torch.cat(laps)[:share]], offset + n
    drawn = torch.cat(drawn)
    return drawn[torch.randperm(len(drawn), generator=generator)]


def step_indices(step, sources, per_step, seed):
    """Window indices for optimizer step `step`: a fresh seeded epoch order per epoch, laid end to end, so the data
    order is a pure function of (seed, step) and no window is dropped at an epoch boundary."""
    start, out = step * per_step, []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), sources if isinstance(sources, int) else sum(k for _, k in sources))
        out.extend(epoch_order(sources, seed, epoch)[offset : offset + per_step - len(out)].tolist())
    return out


def inspect_data(batch, tokenizer, n):
    """Print n windows with the trained tokens marked: [[trained]] text, plain text is context only."""
    for w in range(min(n, batch["input_ids"].shape[0])):
        ids, targets, segs = batch["input_ids"][w], batch["targets"][w], batch["segment_ids"][w]
        used = int((segs > 0).sum())
        trained = [False] + (targets[: used - 1] != -100).tolist()  # trained: the target of the position before it
        print(f"--- window {w}: {used} tokens in {int(segs.max())} document(s), {sum(trained)} trained")
        text = []
        for mode, run in itertools.groupby(zip(ids[:used].tolist(), trained), key=lambda t: t[1]):
            chunk = tokenizer.decode([i for i, _ in run])
            text.append(f"[[{chunk}]]" if mode else chunk)
        print("".join(text))


# ------------------------------------------------------------------------------------------------ loss and evaluation
def loss_sum(model, mb, device, autocast):
    """Sum of token cross-entropies over the supervised positions of one micro-batch. On CPU and CUDA trailing padding
    is cut and only supervised positions reach the output layer (prompts and padding need no logits), both found on the
    host from the CPU tensors: no device synchronisation. Where each new shape compiles (Trainium, compiled layers) the
    decoder sees whole rows, and on Trainium every position gets logits, unsupervised ones counting zero. Attention:
    attention_mode. Under tensor parallelism the logits stay split by vocabulary."""
    if not model.fixed_shapes:  # padding after every row's last token changes nothing before it: leave it out
        real = (mb["segment_ids"] > 0).any(0).nonzero()
        used = int(real.max()) + 1 if len(real) else 1
        mb = {k: v[:, :used] if v.dim() == 2 else v for k, v in mb.items()}
    ids, pos, seg = (mb[k].to(device) for k in ("input_ids", "position_ids", "segment_ids"))
    targets, index = mb["targets"].flatten(), None
    if not compiles_per_shape(device):
        keep = targets != -100
        index, targets = keep.nonzero().squeeze(1).to(device), targets[keep]
    targets = targets.to(device)
    spans = attention_spans(mb["segment_ids"], max(64, ids.shape[1] // 8)) if model.attention == "blocks" else None
    mask = None if model.attention == "causal" else document_mask(seg)
    lengths = (seg > 0).sum(1) if model.neftune_alpha else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model(ids, pos, mask, spans=spans, lengths=lengths).flatten(0, 1)
        logits = model.logits(hidden if index is None else hidden[index]).float()
    if model.par.tp == 1:
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return _VocabParallelCrossEntropy.apply(logits, targets, model.par, model.model.embed_tokens.start).sum()


@torch.no_grad()
def evaluate(model, val, mbs, device, autocast):
    """val_loss = summed token cross-entropy over the whole validation set / its supervised tokens. Each data-parallel
    rank takes an equal share of windows (padded with empty rows: one micro-batch shape), a micro-batch at a time."""
    model.eval()
    par = model.par
    rows = list(range(len(val)))
    rows += [-1] * (-len(rows) % (mbs * par.dp))
    share = len(rows) // par.dp
    mine = rows[par.dp_rank * share : (par.dp_rank + 1) * share]
    # float64 sums, except on Trainium: NeuronCores have no float64, so none may enter a device graph there
    acc = torch.float32 if compiles_per_shape(device) else torch.float64
    total = torch.zeros((), dtype=acc, device=device)
    for start in range(0, share, mbs):
        total += loss_sum(model, val.batch(mine[start : start + mbs]), device, autocast).to(acc)
        sync_device(device)
    model.train()
    return par.all_reduce(total, "dp").item() / max(int(val.supervised.sum()), 1)


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop_ids, pad_id, device, autocast):
    """Greedy decoding of a batch of prompts (left-padded), with a KV cache; returns new token ids per prompt."""
    model.eval()
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((b, longest), pad_id, dtype=torch.long)
    valid = torch.zeros((b, longest), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        valid[i, longest - len(p) :] = True
    ids, valid = ids.to(device), valid.to(device)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    # Pad queries may see themselves, so no attention row is empty; real queries never see pads.
    mask = (causal & valid[:, None, None, :]) | torch.eye(longest, dtype=torch.bool, device=device)
    caches = [{} for _ in model.model.layers]  # each layer's keys and values so far
    out, finished = [[] for _ in range(b)], [False] * b
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model(ids, pos, mask, caches)
        for _ in range(max_new_tokens):
            # the whole vocabulary's logits, gathered over the TP group
            nxt = torch.cat(model.par.all_gather(model.logits(hidden[:, -1]), "tp"), dim=-1).argmax(-1)
            for i, token in enumerate(nxt.tolist()):  # one host sync per generated position
                if not finished[i]:
                    finished[i] = token in stop_ids
                    if not finished[i]:
                        out[i].append(token)
            if all(finished):
                break
            valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            pos = pos[:, -1:] + 1
            hidden = model(nxt[:, None], pos, valid[:, None, None, :], caches)
    model.train()
    return out


def generation_eval(model, records, tokenizer, c, device, autocast):
    """Exact-match accuracy of greedy answers (stripped) on the first N validation records, prompted as they train:
    a single-turn record's prompt; a conversation up to its last assistant turn, with the generation prompt."""
    records, seq_len = records[: c["evaluation.generate.num_prompts"]], c["data.seq_length"]
    single = [r[0] for r in records if isinstance(r, tuple)]
    ids, prompts = iter(prompt_ids(tokenizer, c["data.prompt_format"], single) if single else []), []
    for r in records:
        if isinstance(r, tuple):
            prompts.append(next(ids)[-seq_len:])
        else:
            (context,), _ = template_input(tokenizer, [r], ["validation record"])
            chat = tokenizer.apply_chat_template(context[:-1], tools=r.get("tools"), add_generation_prompt=True)
            prompts.append(list(as_ids(chat))[-seq_len:])
    bs, budget, samples = c["evaluation.generate.batch_size"], c["evaluation.generate.max_new_tokens"], []
    for start in range(0, len(records), bs):
        batch = prompts[start : start + bs]
        answers = generate(model, batch, budget, {tokenizer.eos_token_id}, tokenizer.pad_token_id, device, autocast)
        for r, new in zip(records[start : start + bs], answers):
            prompt, want = r if isinstance(r, tuple) else [r["messages"][k].get("content", "") for k in (-2, -1)]
            answer = tokenizer.decode(new, skip_special_tokens=True).strip()
            samples.append({"prompt": prompt, "expected": want, "answer": answer})
    return sum(s["answer"] == s["expected"].strip() for s in samples) / max(len(records), 1), samples


# ------------------------------------------------------------------------------------------------ optimizer
class DeviceAdamW(torch.optim.AdamW):
    """torch's AdamW update (decoupled weight decay, bias correction, same state and state_dict) for accelerators:
    learning rate, step count and bias corrections are device tensors, so no Python scalar enters a traced graph
    (torch-xla makes 0 and +-1 graph constants: a learning rate reaching 0, or 1 - beta**t rounding to 1, would compile
    a new graph) and nothing is read on the host; scalars go through mul/lerp/add (torch-xla sends addcmul_/addcdiv_'s
    `value=` as float64, which NeuronCores lack); where `skip` is true, weights, moments and step stay as they were (a
    non-finite step, known without a host read). The CPU keeps torch's AdamW."""

    def __init__(self, params, **kwargs):
        super().__init__(params, capturable=True, **kwargs)  # capturable: the step count stays on the device

    @torch.no_grad()
    def step(self, lr, skip):
        """One update at the scheduled learning rate `lr` (a 0-d device tensor), times each group's lr_scale."""
        scheduled = lr
        for group in self.param_groups:
            wd, eps, (beta1, beta2) = group["weight_decay"], group["eps"], group["betas"]
            lr = scheduled if group.get("lr_scale", 1.0) == 1.0 else scheduled * group["lr_scale"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch's AdamW state, the step count on the device (capturable)
                    state.update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p))
                    state["exp_avg_sq"] = torch.zeros_like(p)
                grad = torch.where(skip, 0.0, p.grad)  # a non-finite gradient must not reach the moments
                t = state["step"] + 1
                exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"] * beta2 + grad * grad * (1 - beta2)
                denom = exp_avg_sq.sqrt() / (1 - beta2**t).sqrt() + eps
                new = p * (1 - lr * wd) + exp_avg / denom * (-lr / (1 - beta1**t))
                p.copy_(torch.where(skip, p, new))
                state["exp_avg"].copy_(torch.where(skip, state["exp_avg"], exp_avg))
                state["exp_avg_sq"].copy_(torch.where(skip, state["exp_avg_sq"], exp_avg_sq))
                state["step"].copy_(torch.where(skip, state["step"], t))


def optimizer_groups(modules, c):
    """AdamW's parameter groups with `lr_scale`, their share of the scheduled rate: one, or with LoRA+
    (model.optim.loraplus_lr_ratio) A at it and B (with DoRA's magnitudes) at ratio x it, as PEFT groups them."""
    ratio = c["model.optim.loraplus_lr_ratio"]
    params = [p for _, m in modules for p in lora_parameters(m)]
    if not ratio:
        return [{"params": params, "lr_scale": 1.0}]
    b_side = [p for _, m in modules for p in lora_parameters(m)[1:]]
    return [{"params": [m.lora_A.weight for _, m in modules], "lr_scale": 1.0}, {"params": b_side, "lr_scale": ratio}]


def lr_at(step, c):
    """Linear warmup over warmup_steps (step 0 already trains at lr/warmup), then linear or cosine decay to
    min_lr at the schedule's max_steps (default trainer.max_steps)."""
    lr, warmup, floor = c["model.optim.lr"], c["model.optim.sched.warmup_steps"], c["model.optim.sched.min_lr"]
    total = c["model.optim.sched.max_steps"] or c["trainer.max_steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if c["model.optim.sched.name"] == "cosine":
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return floor + (lr - floor) * (1 - frac)


# ------------------------------------------------------------------------------------------------ training loop
@dataclasses.dataclass
class Run:
    """A training run, every field declared: what main builds before the first step, then what open_run and the
    loop fill in."""

    c: dict  # the resolved config
    arch: Arch
    device: torch.device
    par: Parallel
    model: Llama  # this rank's shard, with LoRA
    modules: list  # (name, LoRALinear) of every adapted projection
    params: list  # their LoRA weights, A and B of each in that order
    autocast: bool  # precision.type: autocast
    tokenizer: object
    train: Windows
    val: Windows | None
    val_records: list  # the first validation records, the generation prompts
    do_generation: bool  # evaluation.generate on this device
    inputs: dict  # content checksums of data, tokenizer and base checkpoint (run_inputs)
    dir: Path  # the run directory
    optimizer: torch.optim.Optimizer | None = None
    metrics: Metrics | None = None  # rank 0 writes, the others hold one that writes nothing
    made_dirs: list = dataclasses.field(default_factory=list)  # made by this launch: removed if it fails early
    start_step: int = 0  # the first step of this launch (a resumed checkpoint's step)
    skipped_steps: int = 0  # non-finite steps skipped before this launch
    last_checkpoint: Path | None = None  # the newest run checkpoint, written or resumed from


def micro_batches(train, start, max_steps, gbs, mbs, seed, par):
    """This rank's micro-batches, step after step: the step's windows (a pure function of seed and step) split evenly
    over data-parallel ranks, each with `scale`, one over the step's supervised tokens on all ranks."""
    share = gbs // par.dp
    for step in range(start, max_steps):
        idx = step_indices(step, train.sources, gbs, seed)
        # one element, not 0-d: torch-xla keeps 0-d uploads in a cache by value, and a value met elsewhere in a graph
        # would then be merged with it into one input, making a graph of another shape
        scale = torch.tensor([1.0 / max(1, int(train.supervised[idx].sum()))])
        mine = idx[par.dp_rank * share : (par.dp_rank + 1) * share]
        for first in range(0, share, mbs):
            yield dict(train.batch(mine[first : first + mbs]), scale=scale)


# The running totals kept on the device, as one vector (a read is one transfer): the loss sum over finite steps, the
# finite steps, the last loss and gradient norm, the skipped steps, the first non-finite step (0: none) and steps done.
Totals = collections.namedtuple("Totals", "loss_sum finite loss grad_norm skipped first_bad done")


class LogInterval:
    """What happened since the last device read: the Totals, device values each step updates in one graph (nothing
    read); tokens and model FLOPs summed on the host from per-row counts. `read`: one transfer."""

    def __init__(self, train, arch, seed, gbs, device, start, skipped):
        self.train, self.flops_per_window = train, window_flops(train, arch)
        self.sources, self.seed, self.gbs = train.sources, seed, gbs
        self.n_rows = sum(k for _, k in train.sources) if train.mix else len(train)  # windows per epoch
        self.total_tokens, self.started = 0, time.perf_counter()
        self.last_read = Totals(0.0, 0.0, 0.0, 0.0, float(skipped), 0.0, float(start))
        self.values = torch.tensor(self.last_read, device=device)
        self.reset()

    def reset(self):
        self.tokens, self.supervised, self.flops, self.steps = 0, 0, 0.0, 0
        self.since = time.perf_counter()

    def add(self, step, step_loss, grad_norm, bad):
        idx = step_indices(step, self.sources, self.gbs, self.seed)
        self.tokens += int(self.train.n_tokens[idx].sum())
        self.supervised += int(self.train.supervised[idx].sum())
        self.flops += float(self.flops_per_window[idx].sum())
        self.steps += 1
        t = Totals(*self.values.unbind())
        done = t.done + 1
        totals = Totals(
            loss_sum=t.loss_sum + torch.where(bad, 0.0, step_loss),
            finite=t.finite + (~bad).float(),
            loss=step_loss,
            grad_norm=grad_norm,
            skipped=t.skipped + bad.float(),
            first_bad=torch.where(bad & (t.first_bad == 0), done, t.first_bad),
            done=done,
        )
        self.values = torch.stack(totals)

    def read(self):
        """The Totals, cumulative, from the device in one transfer; zeros while extracting graphs say nothing and
        are not used, but are read all the same, so that extraction runs the graphs a real run runs."""
        totals = Totals(*self.values.cpu().tolist())
        if extracting_graphs():
            return self.last_read._replace(first_bad=0.0, done=self.last_read.done + self.steps)
        return totals

    def check(self, totals, policy, last_checkpoint, skipped_before):
        """Stop (nonfinite: stop) naming the first non-finite step, or warn about newly skipped ones."""
        if totals.first_bad and policy == "stop":
            raise StageError(
                f"step {int(totals.first_bad)}: the loss or the gradient norm is not finite (its update was "
                f"not applied); last good checkpoint: {last_checkpoint or 'none written yet'}. Lower "
                f"model.optim.lr, or set trainer.nonfinite=skip to skip such steps"
            )
        if totals.skipped > skipped_before:
            warn(f"{int(totals.skipped - skipped_before)} non-finite step(s) skipped ({int(totals.skipped)} in all)")

    def record(self, done, lr, peak, run):
        """The metrics record of this interval (the host read of a log interval), then a fresh interval."""
        t = self.read()
        self.check(t, run.c["trainer.nonfinite"], run.last_checkpoint, self.last_read.skipped)
        mean = (t.loss_sum - self.last_read.loss_sum) / max(1.0, t.finite - self.last_read.finite)
        elapsed = time.perf_counter() - self.since
        finite = {k: v if math.isfinite(v) else None for k, v in (("loss", t.loss), ("grad_norm", t.grad_norm))}
        record = dict(
            step=done, loss=finite["loss"], lr=lr, grad_norm=finite["grad_norm"], skipped_steps=int(t.skipped)
        )
        record.update(tokens_per_s=self.tokens / elapsed, supervised_tokens_per_s=self.supervised / elapsed)
        record.update(consumed_samples=done * self.gbs, epoch=done * self.gbs // self.n_rows)
        memory = peak_memory_gib(run.device)
        if memory is not None:
            record["peak_memory_gib"] = memory
        if peak:
            record["mfu"] = self.flops / elapsed / (peak * run.par.world)
        record.update(compile_counts(run.device, run.c["trainer.compile"]))
        self.total_tokens += self.tokens
        self.last_read = t
        self.reset()
        return record, mean


def train_step(run, loader):
    """One step's forward and backward passes over its micro-batches, the gradient reductions, and the step's
    loss, gradient norm and non-finite flag, as device values (nothing is read here)."""
    c, device, par = run.c, run.device, run.par
    step_loss = torch.zeros((), device=device)
    for _ in range(c["data.global_batch_size"] // (c["data.micro_batch_size"] * par.dp)):
        mb = next(loader)
        s = loss_sum(run.model, mb, device, run.autocast) * mb["scale"].to(device).reshape(())
        s.backward()
        step_loss += s.detach()
        sync_device(device)
    sync_gradients(run.modules, run.params, par)
    grad_norm = global_grad_norm(run.modules, par)
    step_loss = par.all_reduce(step_loss, "dp")
    bad = nonfinite(torch.stack([step_loss, grad_norm]))  # the same on every rank: both are reduced values
    # Cut the graph between the gradient reductions and the update: each then compiles once, whatever follows.
    sync_device(device)
    return step_loss, grad_norm, bad


def apply_update(run, lr, grad_norm, bad):
    """The clipped update, skipped where the step is not finite: on an accelerator decided on the device (DeviceAdamW),
    so the host never waits; the CPU reads the flag. Under graph extraction nothing is decided."""
    if run.c["trainer.gradient_clip_val"]:  # as torch's clip_grad_norm_, on the device: no host synchronisation
        coef = torch.clamp(run.c["trainer.gradient_clip_val"] / (grad_norm + 1e-6), max=1.0)
        for p in run.params:
            p.grad.mul_(coef)
    if isinstance(run.optimizer, DeviceAdamW):  # lr as one element, not 0-d: see micro_batches
        run.optimizer.step(torch.tensor([lr], dtype=torch.float32, device=run.device).reshape(()), skip=bad)
    elif not bool(bad):
        for group in run.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def stop_requests():
    """SIGTERM (preemption, or torchrun passing one on) and Ctrl-C are recorded in the yielded list, so the loop ends
    its step and checkpoints; a second Ctrl-C stops at once (exit 1). Old handlers return after."""
    requests = []

    def request(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in requests:
            raise SystemExit("stopped by a second Ctrl-C, without a checkpoint of this step")
        requests.append(signum)
        if signum == signal.SIGINT:
            print("Ctrl-C: finishing this step and writing a checkpoint (press it again to stop at once)")

    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train_loop(run, stop):
    """Steps start..max_steps with logging, validation and run checkpoints. Device values are read only at log
    intervals, before a checkpoint and at the end (LogInterval); a non-finite step is skipped on the device and, with
    trainer.nonfinite=stop, stops the run at the next read. A stop request on any rank (`stop`, stop_requests) ends the
    run after the step with a checkpoint. Returns (the log interval, the step stopped after or None)."""
    c, par = run.c, run.par
    max_steps, gbs = c["trainer.max_steps"], c["data.global_batch_size"]
    peak, peak_source = peak_flops(run.device, run.autocast, c["trainer.peak_tflops"])
    mfu = f"MFU peak: {peak / 1e12:.2f} TFLOP/s per device x {par.world}" if peak else "MFU not reported"
    print(f"{mfu} ({peak_source})")
    every = c["exp_manager.checkpoint_callback_params.every_n_train_steps"]
    if extracting_graphs() and every:  # every rank would write zeros over the same step_N.tmp
        print("NEURON_EXTRACT_GRAPHS_ONLY: graph extraction only, no run checkpoints are written")
        every = 0
    start = run.start_step
    interval = LogInterval(run.train, run.arch, c["seed"], gbs, run.device, start, run.skipped_steps)
    batches = micro_batches(run.train, start, max_steps, gbs, c["data.micro_batch_size"], c["seed"], par)
    loader = device_loader(batches, run.device)
    bar = tqdm(
        total=max_steps, initial=start, desc="Epoch 0", dynamic_ncols=True, file=sys.stdout, disable=par.rank != 0
    )
    for step in range(start, max_steps):
        lr = lr_at(step, c)
        step_loss, grad_norm, bad = train_step(run, loader)
        stopping = par.any_rank(stop)  # a stop request is host data, shared over the CPU group
        apply_update(run, lr, grad_norm, bad)
        interval.add(step, step_loss, grad_norm, bad)
        sync_device(run.device)
        done = step + 1
        bar.set_description_str(f"Epoch {done * gbs // interval.n_rows}")
        bar.update(1)
        if done % c["trainer.log_every_n_steps"] == 0 or done == max_steps or stopping:
            record, mean = interval.record(done, lr, peak, run)
            run.metrics.log(record)
            last = record["loss"] if record["loss"] is not None else float("nan")
            bar.set_postfix_str(
                f"loss={mean:.3f}, reduced_train_loss={last:.3f}, lr={lr:.3g}, global_step={done}, "
                f"consumed_samples={done * gbs}, tokens/s={record['tokens_per_s']:.0f}"
                + (f", mfu={record['mfu']:.1%}" if peak else "")
            )
        if done % c["trainer.val_check_interval"] == 0 and done != max_steps:
            bar.clear()
            run_evaluation(run, done, gen=False)
        if (every and done % every == 0) or (stopping and not extracting_graphs()):
            totals = interval.read()  # a checkpoint holds only steps that were finite, under nonfinite=stop
            interval.check(totals, c["trainer.nonfinite"], run.last_checkpoint, totals.skipped)
            run.last_checkpoint = save_run_checkpoint(run, done, int(totals.skipped))
        if stopping:
            bar.close()
            return interval, done
    bar.close()
    return interval, None


class Metrics:
    """metrics.jsonl (one object per line, flushed) and TensorBoard scalars, written by rank 0; with run_dir None (the
    other ranks) nothing is written."""

    def __init__(self, run_dir, tensorboard, resume_step=None):
        self.file, self.tb, self.lines = None, None, 0
        if run_dir is None:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.lines = sum(1 for _ in open(run_dir / "metrics.jsonl"))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, TensorBoard drops what the interrupted run logged after the checkpoint.
            self.tb = SummaryWriter(str(run_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()

    def close(self):
        for out in filter(None, (self.file, self.tb)):
            out.close()


# ------------------------------------------------------------------------------------------------ main
# The modes besides training, each of its own (parse_args): what each does before it exits.
MODES = {
    "--dry-run": "check config, tokenizer, checkpoint shards and data, estimate memory per rank",
    "--neuron-env": "print the Neuron compiler/runtime variables of this config as shell export lines (for the "
    'launch: eval "$(python 05_train.py ... --neuron-env)")',
    "--smoke": "run the device path on a tiny random model against the CPU in fp32 and print the checks (no config "
    "file needed; overrides such as trainer.accelerator=xla precision.type=autocast apply; exit 1 if any fails)",
    "--check-config": "check the config's keys, types, ranges and cross-key rules (no files read)",
}


def parse_args(argv):
    """The options, of which --inspect-data N (N >= 1) and each of MODES is a mode of its own."""
    ap = config_arg_parser(__doc__)
    shows = "print N training windows with the trained tokens marked [[like this]], then exit"
    ap.add_argument("--inspect-data", type=int, metavar="N", help=shows)
    for flag, does in MODES.items():
        ap.add_argument(flag, action="store_true", help=f"{does}, then exit")
    args = ap.parse_intermixed_args(argv)
    if args.inspect_data is not None and args.inspect_data < 1:
        raise StageError(f"--inspect-data {args.inspect_data}: the number of windows to show must be >= 1")
    given = [m for m in ["--inspect-data", *MODES] if getattr(args, m[2:].replace("-", "_")) not in (None, False)]
    if len(given) > 1:
        raise StageError(f"{' and '.join(given)} cannot be combined: each is a mode of its own; give one")
    return args


def prepare_settings(c, args):
    """Cross-key checks, seeds, and the model architecture with its parallel layout checked: everything that can
    fail before a device is touched."""
    check_settings(c, launched=not args.dry_run)
    random.seed(c["seed"])
    np.random.seed(c["seed"])
    torch.manual_seed(c["seed"])
    arch = read_model_config(c["model.model_config"])
    window = arch.sliding_window
    if window is not None and window < c["data.seq_length"]:
        raise StageError(
            f"{c['model.model_config']}: sliding_window {window} is shorter than data.seq_length "
            f"{c['data.seq_length']}: this model attends to its last {window} tokens only, the model "
            f"trained here to every earlier token; set data.seq_length <= {window}"
        )
    layout_of(c, arch).check().check_trainable()
    return arch


def open_device(c, arch):
    """The device and the process group, before anything else: on Neuron the group must precede any device
    tensor, and a missing backend then fails before any output is written; then the device's self-check."""
    device = pick_device(c)
    par = Parallel(layout_of(c, arch), device)
    self_check(device, par)
    return device, par


def build_model(c, arch, device, par):
    """The rank's shard of the base model from the converted checkpoint, made ready to train (adapt_model).
    Returns (model, LoRA modules, params)."""
    model = new_model(c, arch, device, par)
    shard, _ = load_base_weights(model, c["exp_manager.resume_from_checkpoint"], c["model.fuse_qkv"], shard_layout(c))
    sync_device(device)  # on XLA: the copies into the fused q/k/v slices run now, not inside a later graph
    print(
        f"loaded {shard.parent} ({par.tp} tensor-parallel shard(s), {model.model.norm.weight.dtype}) on "
        f"{device}; {par.world} process(es): TP {par.tp} x DP {par.dp}"
        + (f"; activation checkpointing on {model.recompute_layers} layer(s)" if model.recompute_layers else "")
    )
    return adapt_model(model, c, device, par)


def new_model(c, arch, device, par):
    """The rank's shard of the base model, its weights not yet filled: bf16 under autocast, else fp32; the layers
    that model.activations_checkpoint asks for recompute their activations in the backward pass."""
    recomputed = checkpointed_layers(c, arch) if c["model.activations_checkpoint"] else 0
    dtype = torch.bfloat16 if c["precision.type"] == "autocast" else torch.float32
    with torch.device(device):
        return Llama(arch, dtype, par, recompute_layers=recomputed)


def checkpointed_layers(c, arch):
    """How many decoder layers, from the first, recompute their activations when activation checkpointing is on."""
    n = c["model.activations_checkpoint_layers"]
    return arch.layers if n is None else min(arch.layers, n)


def adapt_model(model, c, device, par):
    """A loaded base model made ready to train: LoRA added, dropout seeded, the attention chosen, NEFTune set and,
    with trainer.compile, the layers compiled. Returns (model, LoRA modules, params)."""
    modules, params = add_lora(model, c)
    seed_dropout(c["seed"], par, device)
    model.attention = attention_mode(c, device)
    model.neftune_alpha = c["model_alignment_strategy.sft.neftune_noise_alpha"]
    model.fixed_shapes = compiles_per_shape(device) or c["trainer.compile"]
    if c["trainer.compile"]:
        compile_layers(model, device)
    print(f"attention: {model.attention}" + ("; decoder layers compiled" if c["trainer.compile"] else ""))
    model.train()
    sync_device(device)  # on XLA: LoRA's tensors made now, so that a resumed run's first graph is a fresh run's too
    return model, modules, params


def open_run(run, where):
    """The run directory (made by rank 0) and the state to resume from (run.optimizer, metrics, start_step, ...). A new
    run saves config.yaml; a resumed one keeps it and logs step and changed keys to resumes.jsonl."""
    c, par, resume_from = run.c, run.par, where.checkpoint
    run.optimizer = make_optimizer(run.modules, c, run.device)
    if par.rank == 0:
        run.made_dirs = make_dirs(run.dir)
        if where.restart:
            warn(f"{run.dir} holds a run but no complete checkpoint; starting it again from step 0")
            (run.dir / "metrics.jsonl").unlink()
    if resume_from:
        state = load_run_checkpoint(resume_from, par, run.params, run.optimizer, run.device)
        run.start_step, run.skipped_steps, run.last_checkpoint = state["step"], state["skipped_steps"], resume_from
        if par.rank == 0:
            metrics = run.dir / "metrics.jsonl"  # what a killed run logged after its checkpoint goes
            kept = metrics.read_text().splitlines(keepends=True)[: state["metrics_lines"]] if metrics.exists() else []
            write_atomically(metrics, "".join(kept))
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": resume_from.name}
            with open(run.dir / "resumes.jsonl", "a") as f:
                f.write(json.dumps(dict(entry, step=run.start_step, changed=where.changed)) + "\n")
        print(
            f"resuming from {resume_from}: step {run.start_step}, {state['consumed_samples']} samples consumed"
            + "".join(f"; {k}: {old} -> {new}" for k, (old, new) in where.changed.items())
        )
    if par.rank == 0:
        if not resume_from:
            save_config(c, run.dir / "config.yaml")
        print(f"run directory: {run.dir}")
    resumed_at = run.start_step if resume_from else None
    run.metrics = Metrics(run.dir if par.rank == 0 else None, c["exp_manager.create_tensorboard_logger"], resumed_at)
    if run.train.mix and not resume_from:
        run.metrics.log({"step": 0, "data_mix": run.train.mix})


def make_dirs(path):
    """mkdir -p that returns the directories it made, outermost first (so a failed start can remove them)."""
    missing = [p for p in (Path(path), *Path(path).parents) if not p.exists()][::-1]
    Path(path).mkdir(parents=True, exist_ok=True)
    return missing


def run_evaluation(run, step, gen):
    """val_loss over the whole validation set (and, with gen, greedy generation scored by exact match), logged."""
    c, record = run.c, {"step": step}
    if run.val is None:
        return record
    record["val_loss"] = evaluate(run.model, run.val, c["data.micro_batch_size"], run.device, run.autocast)
    if gen and run.do_generation:
        record["gen_exact_match"], samples = generation_eval(
            run.model, run.val_records, run.tokenizer, c, run.device, run.autocast
        )
        record["gen_samples"] = len(samples)
        if run.par.rank == 0:
            (run.dir / f"generations_step{step}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        for s in samples[: c["evaluation.generate.show"]]:
            print(f"    prompt: {s['prompt']!r}\n    answer: {s['answer']!r}   expected: {s['expected']!r}")
    record.update(compile_counts(run.device, c["trainer.compile"]))
    run.metrics.log(record)
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return record


def finish(run, paths, interval):
    """The final validation and generation, the adapter export, and the run summary."""
    c = run.c
    final = run_evaluation(run, c["trainer.max_steps"], gen=True)
    lora = gather_lora(run.modules, run.par)  # a collective: every rank takes part
    if run.par.rank != 0:
        return
    adapter = export_peft_adapter(lora, run.arch, c, run.dir / "final" / "adapter")
    run.metrics.close()
    vals = [json.loads(line).get("val_loss") for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v is not None]
    memory = peak_memory_gib(run.device)
    print(
        f"done: {c['trainer.max_steps']} steps in {time.perf_counter() - interval.started:.0f} s, "
        f"{interval.total_tokens:,} tokens trained"
        + (f", peak memory {memory:.2f} GiB per rank" if memory is not None else "")
    )
    if vals:
        print(
            f"val_loss: first {vals[0]:.4f}, best {min(vals):.4f}, last {vals[-1]:.4f}"
            + (f"; gen_exact_match {final['gen_exact_match']:.0%}" if "gen_exact_match" in final else "")
        )
    fallbacks = cpu_fallback_ops(run.device)
    if fallbacks:
        warn(f"{run.device.type} ran these operations on the CPU (slow on Trainium): {', '.join(fallbacks)}")
    print(f"adapter (PEFT format): {adapter}")
    configs = " ".join(f"--config {p}" for p in paths)
    print(f"merged HF model: python 03_convert_checkpoint.py {configs} --to-hf <dir> --merge-adapter {adapter}")


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # one voice per run: rank 0 prints, the others only fail loudly
        sys.stdout = open(os.devnull, "w")
    if args.smoke:
        return smoke(args)
    paths = args.config or ["config.yaml"]
    c = resolve(load_config(paths, args.overrides), SCHEMA)
    if args.neuron_env:  # this config's Neuron variables and the start-up ones, as shell export lines
        env = neuron_environment(c) | {k: os.environ.get(k, v) for k, v in LAUNCH_ENV.items()} | efa_environment()
        print("".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items()), end="")
        return
    show_settings(c, paths, args.overrides, SCHEMA)
    if args.check_config:
        check_settings(c, launched=False)
        print("config: keys, types, ranges and cross-key rules OK")
        return
    arch = prepare_settings(c, args)
    if args.dry_run:
        return dry_run(c, arch)
    if args.inspect_data:
        tokenizer, train = load_data(c, None, None)[:2]  # a mixture shows the windows of its first step
        rows = range(len(train)) if train.mix is None else step_indices(0, train.sources, len(train), c["seed"])
        inspect_data(train.batch(rows[: args.inspect_data]), tokenizer, args.inspect_data)
        return
    run, where = start_run(c, arch)
    train_run(run, where, paths)


def start_run(c, arch):
    """Everything a run needs before its first step, in the order that fails fastest: device and process group, run
    directory, tokenizer and data (prepared once for later launches), the model. Returns (Run, ResumePoint)."""
    device, par = open_device(c, arch)
    where = resume_point(c, par)
    tokenizer, train, val, inputs = load_data(c, par, where)
    n_prompts = min(c["evaluation.generate.num_prompts"], c["data.dev_choose_samples"] or math.inf)
    val_records = read_records(c["data.val_dir"], "val", n_prompts) if val is not None and n_prompts else []
    model, modules, params = build_model(c, arch, device, par)
    do_generation = c["evaluation.generate.num_prompts"] > 0 and not compiles_per_shape(device)
    if c["evaluation.generate.num_prompts"] > 0 and not do_generation:
        print(f"evaluation.generate: skipped on {device.type} (each new length compiles); use the merged model instead")
    autocast = c["precision.type"] == "autocast"
    parts = (model, modules, params, autocast, tokenizer, train, val, val_records, do_generation, inputs, where.dir)
    return Run(c, arch, device, par, *parts), where


def load_data(c, par, where):
    """The tokenizer, the prepared train and val splits, and what the run trains on by content (run_inputs), which a
    resumed run (where.checkpoint) must share with its checkpoint."""
    tokenizer = load_tokenizer(c)
    train = load_split(c["data.train_dir"], tokenizer, c, "train", par)
    val = load_split(c["data.val_dir"], tokenizer, c, "val", par) if c["data.val_dir"] else None
    inputs = run_inputs(c, train, val)
    if where is not None and where.checkpoint:
        same_inputs(where.checkpoint, inputs)
    return tokenizer, train, val, inputs


def train_run(run, where, paths):
    """The run in its directory: the baseline evaluation of a new run, the steps, and the export, or the line that
    tells how to resume after a stop request. A failure before the first step removes the directory it made."""
    c = run.c
    try:
        open_run(run, where)
        if not where.checkpoint:
            run_evaluation(run, 0, gen=True)
        if c["trainer.max_steps"] == 0:
            run.metrics.close()
            print("trainer.max_steps=0: baseline evaluation only, no adapter written")
            return
        with stop_requests() as stop:
            interval, stopped_after = train_loop(run, stop)
    except BaseException:  # before its first step a launch removes the files it wrote, and the directories it made
        written = re.compile(r"config\.yaml|metrics\.jsonl|events\.out\.tfevents\..+|generations_step0\.jsonl")
        metrics = run.dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if run.made_dirs and not any("loss" in json.loads(line) for line in lines):  # made_dirs: rank 0 only
            for f in [f for f in run.dir.iterdir() if f.is_file() and written.fullmatch(f.name)]:
                f.unlink()
            with contextlib.suppress(OSError):  # when empty: anything else put there stays, with its directory
                for d in reversed(run.made_dirs):
                    d.rmdir()
        raise
    if stopped_after is not None:
        run.metrics.close()
        cause = signal.Signals(stop[0]).name if stop else "another rank's stop request"
        print(
            f"stopped by {cause} after step {stopped_after}; resume with exp_manager.resume_if_exists=true "
            f"(checkpoint {run.last_checkpoint})"
        )
        return
    finish(run, paths, interval)


# ------------------------------------------------------------------------------------------------ appendix
# The infrastructure the story above relies on: tensor parallelism, the devices (every device-specific branch is in
# that section: a CPU or CUDA user may delete its XLA and Neuron parts), run checkpoints, the pre-flight checks of
# --dry-run, the FLOP count of the MFU, and the blocks repeated identically in other stages (layout, records, shared).


# ------------------------------------------------------------------------------------------------ layout
# The model's architecture and how NxD lays it out over tensor-parallel ranks, repeated in stages 03 and 05 (the
# same text, tests/test_config.py): 03 writes each rank's shard by this layout, 05 builds each rank's model from it
# and reassembles the adapter with it, so no index ever travels between ranks.
@dataclasses.dataclass(frozen=True)
class Arch:
    """A Llama-family architecture, from an HF config.json (arch_of)."""

    vocab: int
    hidden: int
    inter: int  # the MLP's intermediate size
    layers: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    eps: float = 1e-6  # RMSNorm
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1's "llama3" frequency scaling
    tie: bool = False  # output layer tied to the embedding
    sliding_window: int | None = None  # Mistral only


def arch_of(raw):
    """The Arch of an HF config.json (as a dict; old and new rope key styles). KeyError names a missing key."""
    heads = raw["num_attention_heads"]
    rope = dict(raw.get("rope_parameters") or {})
    return Arch(
        vocab=raw["vocab_size"],
        hidden=raw["hidden_size"],
        inter=raw["intermediate_size"],
        layers=raw["num_hidden_layers"],
        heads=heads,
        kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta") or rope.get("rope_theta", 10000.0),
        rope_scaling=raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None),
        tie=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=raw.get("sliding_window") if raw.get("model_type") == "mistral" else None,
    )


class Layout:
    """Which heads, and so which rows of every weight, each tensor-parallel rank holds, as NxD's converter lays a
    checkpoint out (--qkv_linear, --hw_backend). Column-parallel weights (embedding, q/k/v, gate/up, output layer)
    are split by rows, row-parallel ones (o_proj, down_proj) by input columns, norms replicated. KV heads are
    copied kv_mult times (kv_replicator), then split: on trn1 tiled (K0..K7, K0..K7, ...), rank r holding the Q
    head group (r % kv) * (tp / kv) + r // kv, which belongs to its KV head r % kv; on trn2 each head's copies on
    adjacent ranks (K0, K0, ..., K1, K1, ...), with Q heads in order."""

    def __init__(self, arch, tp=1, kv_mult=1, hw_backend="trn1"):
        self.arch, self.tp, self.kv_mult, self.hw_backend = arch, tp, kv_mult, hw_backend

    def heads(self, r):
        """(Q heads, KV heads) of tensor-parallel rank r."""
        heads, kv, tp, m = self.arch.heads, self.arch.kv_heads, self.tp, self.kv_mult
        per_q, per_kv = heads // tp, kv * m // tp
        group = (r % kv) * (tp // kv) + r // kv if self.hw_backend == "trn1" and m > 1 else r
        copies = range(r * per_kv, (r + 1) * per_kv)  # positions in the list of KV heads with their copies
        kv_heads = [t // m if self.hw_backend == "trn2" else t % kv for t in copies]
        return list(range(group * per_q, (group + 1) * per_q)), kv_heads

    def part(self, n, r):
        """(first, end) of rank r's share of n rows split evenly."""
        return r * n // self.tp, (r + 1) * n // self.tp

    def check(self):
        """The layout exists: TP divides every split dimension, and on trn1 with copies the copies fill TP."""
        arch, tp, m = self.arch, self.tp, self.kv_mult
        checks = [
            ("num_attention_heads", arch.heads),
            ("num_key_value_heads x kv_replicator", arch.kv_heads * m),
            ("intermediate_size", arch.inter),
            ("vocab_size", arch.vocab),
        ]
        bad = [f"{what} ({n})" for what, n in checks if n % tp]
        if bad:
            raise StageError(f"distributed_strategy.tensor_model_parallel_size {tp} does not divide {', '.join(bad)}")
        if m > 1 and self.hw_backend == "trn1" and arch.kv_heads * m != tp:
            raise StageError(
                f"with kv_replicator > 1, num_key_value_heads x kv_replicator ({arch.kv_heads * m}) must equal "
                f"tensor_model_parallel_size ({tp}) on trn1"
            )
        return self

    def check_trainable(self):
        """What grouped-query attention needs beyond check(): at least as many Q heads as KV heads on every rank.
        (Then each local Q head's KV head is local, on trn1 and trn2: tests/test_parallel.py checks it over a grid
        of models and layouts.)"""
        q, kv = self.heads(0)
        if len(q) % len(kv):
            raise StageError(
                f"with tensor_model_parallel_size {self.tp} and kv_replicator {self.kv_mult}, each rank would hold "
                f"{len(q)} Q heads and {len(kv)} KV heads; each KV head needs its own Q heads (lower kv_replicator "
                f"to at most num_attention_heads / num_key_value_heads)"
            )
        return self

    def kv_groups(self):
        """Tensor-parallel ranks grouped by the KV heads they hold (copies of a head sit in one group)."""
        groups = {}
        for r in range(self.tp):
            groups.setdefault(tuple(self.heads(r)[1]), []).append(r)
        return list(groups.values())


# ------------------------------------------------------------------------------------------------ tensor parallel
def layout_of(c, arch):
    """The Layout that the config's distributed_strategy.* asks for."""
    return Layout(arch, *shard_layout(c).values())


def layout_rows(layout, r):
    """{projection: the rows (column-parallel) or input columns (row-parallel) of the full weight that
    tensor-parallel rank r holds}, as index tensors."""
    arch, (q_heads, kv_heads) = layout.arch, layout.heads(r)
    hd, inter = arch.head_dim, arch.inter
    q_full, kv_full = arch.heads * hd, arch.kv_heads * hd
    cols = torch.arange(*layout.part(inter, r), device="cpu")
    return {
        "qkv_proj": torch.cat(
            [head_index(q_heads, hd), head_index(kv_heads, hd, q_full), head_index(kv_heads, hd, q_full + kv_full)]
        ),
        "o_proj": head_index(q_heads, hd),
        "gate_up_proj": torch.cat([cols, inter + cols]),
        "down_proj": cols,
        "lm_head": torch.arange(*layout.part(arch.vocab, r), device="cpu"),
    }


def head_index(heads, hd, offset=0):
    """The rows of the given heads (head_dim hd each) in a projection whose head rows start at offset."""
    return torch.cat([torch.arange(offset + h * hd, offset + (h + 1) * hd, device="cpu") for h in heads])


class Parallel:
    """This process's place in the run and the collectives the model needs. `layout`: which heads each tensor-parallel
    rank holds. Tensor-parallel groups are consecutive ranks (as in Megatron and NxD); data-parallel groups join ranks
    of the same tensor-parallel rank; 'kv' groups join the tensor-parallel ranks holding copies of one KV head
    (kv_replicator > 1). Device collectives go through the process group's backend (start_process_group,
    device_all_reduce), host data (strings, barriers, stop requests) over a CPU gloo group. In a single process every
    collective is the identity."""

    def __init__(self, layout, device, world=None, rank=None, connect=True):
        self.layout, tp = layout, layout.tp
        self.world = world or int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = rank if rank is not None else int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.tp, self.dp = tp, self.world // tp
        self.tp_rank, self.dp_rank = self.rank % tp, self.rank // tp
        self.device = device
        kv_groups = layout.kv_groups()
        self.groups = {
            "tp": [list(range(d * tp, (d + 1) * tp)) for d in range(self.dp)],
            "dp": [list(range(t, self.world, tp)) for t in range(tp)],
            "kv": [[d * tp + t for t in g] for d in range(self.dp) for g in kv_groups],
            "world": [list(range(self.world))],
        }
        self.mine = {name: next(g for g in gs if self.rank in g) for name, gs in self.groups.items()}
        self.handles, self.host = {}, None
        if not connect:  # layout only (the dry run's per-rank checks)
            return
        if self.world > 1:
            groups_per_call = start_process_group(device)
            # Host data (the run directory, barriers, stop requests) travels over gloo on the CPU, never through
            # device collectives: NxD does the same, and under neuron_parallel_compile every device graph
            # returns zeros, so a device barrier would synchronise nothing and a payload would come back empty.
            gloo = dist.get_backend() == "gloo"
            self.host = dist.group.WORLD if gloo else dist.new_group(list(range(self.world)), backend="gloo")
            if not groups_per_call:
                for name, gs in self.groups.items():  # every rank creates every group, in the same order
                    for g in gs:
                        handle = dist.new_group(g)
                        if self.rank in g:
                            self.handles[name] = handle

    def size(self, name):
        return len(self.mine[name])

    def all_reduce(self, x, name, op="sum"):
        """Sum (or max) of x over the group `name`; a new tensor, identical on every member."""
        return x if self.size(name) == 1 else device_all_reduce(x, self.groups[name], self.handles.get(name), op)

    def all_gather(self, x, name):
        """[x of each member of the group `name`], in group order."""
        n = self.size(name)
        return [x] if n == 1 else device_all_gather(x, self.groups[name], self.handles.get(name), n)

    def barrier(self, timeout_s=None):
        """Every rank waits here for all the others (file writes before, reads after); `timeout_s` for a wait
        that may outlast the group's timeout (a data preparation)."""
        if self.world > 1:
            if timeout_s:
                dist.monitored_barrier(group=self.host, timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier(group=self.host)

    def broadcast(self, obj):
        """Rank 0's `obj` (plain Python values), on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.host)
        return box[0]

    def any_rank(self, flag):
        """True on every rank when `flag` (a host value) is true on any rank."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host)
        return bool(t.item())

    def enter_tp_region(self, x):
        """Enter a tensor-parallel region: identity forward; the input gradient is summed over the TP group."""
        return x if self.tp == 1 else _EnterTPRegion.apply(x, self)

    def exit_tp_region(self, x):
        """Leave a row-parallel region: partial results summed over the TP group; gradient passed through."""
        return x if self.tp == 1 else _ExitTPRegion.apply(x, self)


class _EnterTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, par):
        ctx.par = par
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.par.all_reduce(grad, "tp"), None


class _ExitTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, par):
        return par.all_reduce(x, "tp")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy over vocabulary-split logits, not gathered: the max, the softmax denominator and the
    target's logit are reduced over the TP group. Targets -100 (padding too) give 0 and no gradient. `start` (a device
    tensor): this rank's first vocabulary row."""

    @staticmethod
    def forward(ctx, logits, targets, par, start):
        rows = logits.shape[-1]
        z = logits - par.all_reduce(logits.max(dim=-1).values, "tp", op="max")[:, None]
        local = targets - start
        here = (local >= 0) & (local < rows)
        local = local.clamp(0, rows - 1)
        picked = par.all_reduce(z.gather(1, local[:, None]).squeeze(1) * here, "tp")
        exp = z.exp()
        total = par.all_reduce(exp.sum(dim=-1), "tp")
        valid = (targets != -100).to(logits.dtype)
        ctx.save_for_backward(exp.div_(total[:, None]), local, here, valid)
        return (total.log() - picked) * valid

    @staticmethod
    def backward(ctx, grad):
        softmax, local, here, valid = ctx.saved_tensors
        g = softmax
        g.scatter_add_(1, local[:, None], -here.to(g.dtype)[:, None])
        return g * (grad * valid)[:, None], None, None, None


# ------------------------------------------------------------------------------------------------ devices
# Variables that matter only if set before a process starts, so they are exported by whoever launches it
# (04_precompile.sh, or `eval "$(python 05_train.py ... --neuron-env)"` before torchrun): glibc reads
# MALLOC_ARENA_MAX at start-up (the tutorial's launch sets 128 to bound host memory over 32 ranks).
LAUNCH_ENV = {"MALLOC_ARENA_MAX": "128"}


# Across nodes, Trainium's collectives go over EFA through libfabric, which reads these when the Neuron runtime starts
# (Neuron's multi-node guide and NxDT's train_setup.sh set them; FI_EFA_FORK_SAFE for hosts that fork after EFA is up).
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}


# Where a Neuron host shows its devices (neuron0, neuron1, ...): such a host must never train on the CPU by
# accident. A module constant so that tests can point the check elsewhere.
NEURON_DEVICE_DIR = "/dev"


def nodes():
    """How many nodes the launch spans: NNODES (as 04 reads it), else SLURM's node count, else torchrun's world
    over its local world."""
    for key in ("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return world // local if local else 1


def efa_environment():
    """The EFA variables for a launch over several nodes (a variable already set wins), else nothing."""
    if nodes() <= 1:
        return {}
    for key, value in EFA_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in EFA_ENV}


def neuron_environment(c):
    """The tutorial's Neuron compiler and runtime settings as environment variables (set before torch-xla starts; one
    the user set wins; the configured compiler flags join NEURON_CC_FLAGS unless there, so that 04's launch and the
    training launch compile alike and share the cache). Harmless on other XLA devices. Returns what it set. Deliberately
    absent: BUCKET_CAP_MB (DDP's gradient all-reduce bucket size; this loop reduces one flat gradient itself)."""
    n = "xla.neuron."
    flags = c[n + "compiler_flags"]
    # The compiler casts fp32 matrix products to bf16 unless told not to: --auto-cast none keeps fp32 fp32, and with
    # autocast leaves bf16 to autocast (accumulating in fp32)
    if c["precision.type"] == "autocast":
        flags += " --enable-mixed-precision-accumulation"
    flags += " --auto-cast none"
    inherited = os.environ.get("NEURON_CC_FLAGS", "")
    env = {
        "NEURON_CC_FLAGS": inherited if flags in inherited else f"{inherited} {flags}".strip(),
        "NEURON_COMPILE_CACHE_URL": os.path.expanduser(c[n + "compiler_cache_url"]),
        "NEURON_FUSE_SOFTMAX": str(int(c[n + "fuse_softmax"])),
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": str(c[n + "async_exec_max_inflight_requests"]),
        "NEURON_RT_EXEC_TIMEOUT": str(c[n + "rt_exec_timeout"]),
        "NEURON_EXPERIMENTAL_COMPRESS_RG": str(int(c[n + "experimental_compress_rg"])),
        "XLA_USE_BF16": "0",
        "XLA_DOWNCAST_BF16": "0",
        "NEURON_RT_STOCHASTIC_ROUNDING_EN": "0",
        **efa_environment(),
    }
    for key, value in env.items():
        if key == "NEURON_CC_FLAGS" or key not in os.environ:
            os.environ[key] = value
    # Always 0, whatever is inherited (the tutorial's launch script sets 0 too): a 1 puts torch-xla on its legacy
    # path without functionalization, where in-place updates through views are known to give wrong results.
    if os.environ.get("XLA_DISABLE_FUNCTIONALIZATION", "0") != "0":
        warn("XLA_DISABLE_FUNCTIONALIZATION=1 in the environment is overridden with 0")
    os.environ["XLA_DISABLE_FUNCTIONALIZATION"] = "0"
    return {key: os.environ[key] for key in [*env, "XLA_DISABLE_FUNCTIONALIZATION"]}


def neuron_devices_present():
    return any(Path(NEURON_DEVICE_DIR).glob("neuron[0-9]*"))


def native_accelerator():
    """The accelerator PyTorch itself reports (CUDA, TorchNeuron's `neuron`, XPU, ...), or None. TorchNeuron registers
    its device when torch_neuronx is imported (which fails without Neuron devices); where torch-xla is installed,
    torch_neuronx is trn1's XLA package, whose `neuron` device does not train: that host trains through XLA."""
    xla = importlib.util.find_spec("torch_xla") is not None
    if importlib.util.find_spec("torch_neuronx") and not xla:
        with contextlib.suppress(Exception):
            import torch_neuronx  # noqa: F401  registers the `neuron` device
    if not torch.accelerator.is_available():
        return None
    native = torch.accelerator.current_accelerator()
    return None if native.type == "neuron" and xla else native


def pick_device(c):
    """The device this process trains on. auto: the native accelerator PyTorch reports (CUDA, `neuron`, ...), else XLA
    when torch-xla imports, else the CPU, but a host with Neuron devices and no usable backend is refused. Under
    torchrun a CUDA process takes its LOCAL_RANK's GPU; TorchNeuron binds a process to its cores from LOCAL_RANK itself
    (no index); XLA assigns its own device. Creates no tensor (on Neuron the process group comes first)."""
    choice, native = c["trainer.accelerator"], native_accelerator()
    if choice == "auto":
        if native is not None:
            choice = native.type
        elif importlib.util.find_spec("torch_xla"):
            choice = "xla"
        elif neuron_devices_present():
            raise StageError(
                f"this host has Neuron devices ({NEURON_DEVICE_DIR}/neuron*) but no usable PyTorch backend for them: "
                f"install torch-neuronx (TorchNeuron, trn2/trn3: requirements-trn2.txt) or torch-neuronx with "
                f"torch-xla (trn1: requirements-neuron.txt); set trainer.accelerator=cpu to train on the CPU anyway"
            )
        else:
            choice = "cpu"
    if choice == "xla":
        if not importlib.util.find_spec("torch_xla"):
            raise StageError(
                "trainer.accelerator=xla but torch-xla is not installed (Trainium trn1: "
                "requirements-neuron.txt; XLA on CPU: make test-xla's environment)"
            )
        neuron_environment(c)
        import torch_xla
        import torch_xla.runtime as xr

        if c["xla.cache_dir"] and os.environ.get("PJRT_DEVICE") != "NEURON":
            xr.initialize_cache(c["xla.cache_dir"], readonly=False)  # Neuron caches in NEURON_COMPILE_CACHE_URL
        return torch_xla.device()
    if choice == "cpu":
        return torch.device("cpu")
    if native is None or native.type != choice:
        need = {
            "neuron": "torch-neuronx 2.13 (TorchNeuron, trn2/trn3; requirements-trn2.txt) on a host with "
            "Neuron devices",
            "cuda": "a CUDA build of torch and a visible GPU",
        }.get(choice, choice)
        raise StageError(f"trainer.accelerator={choice} but PyTorch has no {choice} device here; this needs {need}")
    if choice == "neuron":
        efa_environment()  # before the process group starts the runtime
        return torch.device("neuron")
    return torch.device(choice, int(os.environ.get("LOCAL_RANK", "0")))


def start_process_group(device):
    """The process group of this launch: torch-xla's "xla" backend on XLA, else the device's default backend (gloo on
    the CPU, nccl on CUDA, neuron on TorchNeuron). True where collectives take their replica groups per call
    (torch-xla), so that no torch.distributed subgroups are made."""
    xla = device.type == "xla"
    if not dist.is_initialized():
        if xla:
            import torch_xla.distributed.xla_backend  # noqa: F401  registers the "xla" backend

            dist.init_process_group("xla", init_method="xla://")
        else:
            dist.init_process_group(dist.get_default_backend_for_device(device))
    return xla


# The aten operators of a training step that a device must run with kernels of its own, each as the chain of calls
# reaching it ("mm>mm.out": mm's device-generic kernel calls mm.out, needed unless the device has a kernel for mm);
# allocation, strided views and host reads, without which nothing runs, are left out. tests/test_accelerator.py traces
# a real step (TP 1 and 2, fp32 and autocast, every feature, SDPA's math path) and fails when this list is stale.
STEP_OPS = """
_log_softmax>_log_softmax.out _log_softmax_backward_data>_log_softmax_backward_data.out
_safe_softmax>all.dim>all.out _safe_softmax>isneginf>isneginf.out _safe_softmax>where.self_out
_softmax_backward_data>_softmax_backward_data.out add.Tensor>add.out add_.Tensor>add.out any>any.all_out
bitwise_and.Tensor>bitwise_and.Tensor_out bitwise_not>bitwise_not.out bitwise_or.Tensor>bitwise_or.Tensor_out
bmm>bmm.out cat>cat.out clamp>clamp.out cos>cos.out div.Scalar>div.Tensor>div.out div.Tensor>div.out
div_.Tensor>div.out embedding>index_select embedding>view eq.Scalar>eq.Scalar_out eq.Tensor>eq.Tensor_out
exp>exp.out gather>gather.out ge.Scalar>ge.Scalar_out ge.Tensor>ge.Tensor_out gt.Scalar>gt.Scalar_out
lerp.Scalar>lerp.Scalar_out log>log.out lt.Scalar>lt.Scalar_out masked_fill.Scalar>masked_fill_.Scalar
max.dim>max.dim_max mean.dim>mean.out mm>mm.out mul.Scalar>mul.Tensor>mul.out mul.Tensor>mul.out mul_.Tensor>mul.out
ne.Scalar>ne.Scalar_out ne.Tensor>ne.Tensor_out neg>neg.out nll_loss_backward>nll_loss_backward.grad_input
nll_loss_forward>nll_loss_forward.output ones>fill_.Scalar ones_like>fill_.Scalar pow.Scalar>pow.Scalar_out
pow.Tensor_Scalar>pow.Tensor_Scalar_out rand>uniform_ rand_like>uniform_ reciprocal>reciprocal.out rsqrt>rsqrt.out
rsub.Scalar>sub.Tensor>sub.out scatter_add_>scatter_add.out silu>silu.out silu_backward>silu_backward.grad_input
sin>sin.out sqrt>sqrt.out stack>cat>cat.out stack>view sub.Tensor>sub.out sum.dim_IntList>sum.IntList_out
sum>sum.dim_IntList>sum.IntList_out tril>tril.out view where.self zeros>zero_ zeros_like>zero_
""".split()


def self_check(device, par):
    """Before any weights load, each thing the run needs of the device and its software (the probes below) is tried
    once, so that a missing piece fails in seconds naming itself rather than after a compile or at step 10."""
    key = "PrivateUse1" if device.type == torch._C._get_privateuse1_backend_name() else device.type.upper()
    missing = [] if device.type == "cpu" else fallback_ops(key)
    if missing and len(missing) == len(STEP_OPS):  # a backend that registers no kernels per operator: untellable
        print(f"self-check: {device.type} registers no kernel per operator; its CPU fallbacks are reported as they run")
        missing = []
    ranks = torch.arange(1.0, par.world + 1)
    probes = {
        f"operators of the step without a {key} kernel (they would run on the CPU)": lambda: ", ".join(missing),
        "RNG state get/set": lambda: set_rng_states(rng_states(device), device),
        "memory statistics": lambda: peak_memory_gib(device) and None,
        "pinned non_blocking copy": lambda: pinned_copy_problem(device),
        "all_reduce and all_gather over every rank": lambda: collectives_problem(par, device, ranks),
    }
    for what, probe in probes.items():
        try:
            problem = probe()
        except Exception as e:
            problem = f"{type(e).__name__}: {e}".splitlines()[0]
        if problem:  # with the versions of the software the device runs on
            installed = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()}
            found = [
                f"{p} {installed[p]}"
                for p in "torch torch-xla torch-neuronx neuronx-cc libneuronxla".split()
                if p in installed
            ]
            cuda = [f"CUDA {torch.version.cuda}"] if torch.version.cuda else []
            raise StageError(f"device self-check on {device}: {what}: {problem}; found {', '.join(found + cuda)}")


def fallback_ops(key, ops=STEP_OPS):
    """The operators among `ops` that dispatch key `key` would run through its backend fallback (on the CPU) or not at
    all. "A>B": an operator B that A's device-generic kernel calls, needed only where no operator before it in the chain
    has a kernel of the device's own."""

    def kernel(name):  # how the dispatcher runs `name` for the key, as its dispatch table says
        for line in torch._C._dispatch_dump_table(name).splitlines():
            if line.startswith(f"{key}:"):
                return line.rsplit("[", 1)[-1].rstrip("]")
        return None

    def missing(entry):
        *callers, name = (f"aten::{op}" for op in entry.split(">"))
        return not any(kernel(caller) == "kernel" for caller in callers) and kernel(name) in (None, "backend fallback")

    return [entry for entry in ops if missing(entry)]


def pinned_copy_problem(device):
    """Where the loader pins (prefetched): a pinned host tensor copied without blocking comes back unchanged."""
    if device.type in ("cpu", "xla") or not torch.accelerator.is_available():
        return None
    host = torch.arange(8.0).pin_memory()
    back = host.to(device, non_blocking=True).cpu()
    return None if torch.equal(back, host) else f"came back as {back.tolist()}"


def collectives_problem(par, device, ranks):
    """Each rank contributes its rank + 1 (uploaded as one element, so every rank runs the same graph on XLA)."""
    mine = ranks[par.rank : par.rank + 1].to(device)
    total, gathered = par.all_reduce(mine, "world").cpu(), torch.cat(par.all_gather(mine, "world")).cpu()
    if extracting_graphs() or (total.item() == ranks.sum().item() and torch.equal(gathered, ranks)):
        return None
    return f"sum {total.tolist()}, gathered {gathered.tolist()}; expected {ranks.sum().item()} and {ranks.tolist()}"


def device_all_reduce(x, groups, handle, op):
    """Sum (or max) of x over a group: torch-xla's all-reduce over the replica `groups` on XLA, else torch.distributed's
    over the subgroup `handle`, a 0-d tensor as one element (TorchNeuron's collectives take 1-element tensors). A new
    tensor."""
    if x.device.type == "xla":
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM if op == "sum" else xm.REDUCE_MAX, x, groups=groups)
    y = x.reshape(1).clone() if x.dim() == 0 else x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=handle)
    return y.reshape(x.shape)


def device_all_gather(x, groups, handle, size):
    """[x of each member of a group of `size`], in group order (as device_all_reduce: replica groups on XLA, else
    the subgroup `handle`, 0-d tensors as one element)."""
    if x.device.type == "xla":
        import torch_xla.core.xla_model as xm

        # pin_layout=False (as NxD): the pinned variant is built from an all-reduce over a buffer placed at
        # this rank's ordinal, so its graph would differ from rank to rank.
        return list(xm.all_gather(x.unsqueeze(0), dim=0, groups=groups, pin_layout=False).unbind(0))
    if x.dim() == 0:
        return [y.reshape(()) for y in device_all_gather(x.reshape(1), groups, handle, size)]
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous(), group=handle)
    return out


def sync_device(device):
    """End of a traced XLA graph (one per micro-batch and one per optimizer step); nothing elsewhere."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def compiles_per_shape(device):
    """Trainium, through XLA (trn1) or TorchNeuron (trn2/trn3): every new tensor shape compiles anew, so every
    micro-batch keeps one shape; and NeuronCores have no float64."""
    return device.type in ("xla", "neuron")


def extracting_graphs():
    """True under neuron_parallel_compile's extraction run (NEURON_EXTRACT_GRAPHS_ONLY=1), where every device graph
    returns zeros: no decision may then be taken from a device value, and nothing written is a real result."""
    return os.environ.get("NEURON_EXTRACT_GRAPHS_ONLY") == "1"


def attention_mode(c, device):
    """How packed rows attend (model.attention), resolved for this device:
    blocks  each block of queries against only the keys its documents can reach (host-computed spans, a new shape
            per batch): the CPU default, fastest there (bench/train_bench.py);
    masked  SDPA over the whole row with the block-diagonal causal mask: one static shape, any device (the default
            on CUDA and XLA; on TorchNeuron a mask may leave the fused kernel for an unfused one, packing's price);
    causal  SDPA's causal kernel, no mask (Neuron's fused kernel, CUDA's flash kernel): exact only with one document
            per row, so only without packing (the default on `neuron` then)."""
    mode, packing = c["model.attention"], c["model_alignment_strategy.sft.packing"]
    fixed = compiles_per_shape(device) or c["trainer.compile"]
    if mode == "auto":
        if device.type == "neuron" and not packing:
            return "causal"
        return "blocks" if device.type == "cpu" and not fixed else "masked"
    if mode == "blocks" and fixed:
        raise StageError(
            f"model.attention=blocks changes shapes with every batch, which "
            f"{'trainer.compile' if c['trainer.compile'] else device.type} recompiles each time; use masked (or auto)"
        )
    return mode


def lora_add(y, a, b, scaling):
    """y + scaling * a B^T as one GEMM accumulating into y (addmm). torch-xla runs addmm with alpha != 1 on the CPU
    (copying the operands to the host), so on XLA the scale goes on the small [tokens, r] factor instead."""
    y2, a2 = y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1])
    if y.device.type == "xla":
        return torch.addmm(y2, a2 * scaling, b.t()).view(y.shape)
    return torch.addmm(y2, a2, b.t(), alpha=scaling).view(y.shape)


def recomputed(layer, x, cos, sin, mask, spans):
    """Run a layer keeping only its input; the backward pass recomputes the rest. XLA needs torch-xla's variant
    (it stops the compiler from merging the recomputation back into the forward pass), which is reentrant: it
    passes gradients only through inputs that require them, so the frozen embedding's output is made to."""
    if x.device.type != "xla":
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, x, cos, sin, mask, None, spans, use_reentrant=False)
    from torch_xla.utils.checkpoint import checkpoint

    if not x.requires_grad:
        x = x.detach().requires_grad_()
    return checkpoint(layer, x, cos, sin, mask, None, spans, use_reentrant=True)


def make_optimizer(modules, c, device):
    """torch's AdamW on the CPU, DeviceAdamW (the same update, decided on the device) elsewhere."""
    kind = torch.optim.AdamW if device.type == "cpu" else DeviceAdamW
    settings = {k: c[f"model.optim.{k}"] for k in ("lr", "eps", "weight_decay")}
    return kind(optimizer_groups(modules, c), betas=tuple(c["model.optim.betas"]), **settings)


def device_loader(batches, device):
    """On XLA, torch-xla's loader copies the next batches in the background; on TorchNeuron each is copied one ahead
    from pinned memory (prefetched); on CPU and CUDA the loss moves each after cutting it."""
    if device.type == "xla":
        import torch_xla.distributed.parallel_loader as pl

        return iter(pl.MpDeviceLoader(batches, device))
    return prefetched(batches, device, pin=True) if device.type == "neuron" else iter(batches)


def prefetched(batches, device, pin):
    """The batches on the device, each copy issued one batch ahead to overlap the step before, from pinned host memory
    (where an accelerator can pin) with non_blocking copies. A copy reads its host batch after the call returns, and not
    every allocator keeps pinned memory alive for a pending copy as CUDA's does, so each host batch is held until an
    event recorded after its copy has passed (looked at without waiting), or, without events, for the next few
    batches."""
    pin = pin and torch.accelerator.is_available()
    held = collections.deque()  # (event after the copy or None, its host batch), oldest first

    def moved(batch):
        host = {k: v.pin_memory() if pin else v for k, v in batch.items()}
        out = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        if device.type != "cpu":  # a copy to the CPU is done when it returns
            held.append((copy_event(device), host))
            while held and (len(held) > HELD_BATCHES or (held[0][0] is not None and held[0][0].query())):
                event, _ = held.popleft()
                if event is not None:
                    event.synchronize()
        return out

    ahead = None
    for batch in batches:
        current, ahead = ahead, moved(batch)
        if current is not None:
            yield current
    if ahead is not None:
        yield ahead


HELD_BATCHES = 4  # host batches held at most while their copies may still be reading them


def copy_event(device):
    """An event recorded on the device's current stream, or None where the device has no events."""
    try:
        event = torch.Event(device=device)
        event.record()
        return event
    except (RuntimeError, NotImplementedError):
        return None


def upload_optimizer_state(optimizer, device):
    """On XLA, the restored AdamW state as a fresh run holds it, so that the update graph is the one the fresh run (and
    04) compiled: each tensor its own device buffer, made in the fresh run's order (a graph's outputs follow the order
    their tensors were made). torch-xla uploads a 0-d tensor when a graph first reads it, one buffer per value, so equal
    step counts, or a count equal to the LoRA+ ratio say, would reach the update as one merged input."""
    if device.type != "xla":
        return
    import torch_xla.core.xla_model as xm

    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if p in optimizer.state]
    uploaded = iter(xm.send_cpu_data_to_device([t.cpu() for s in states for t in s.values()], device))
    for state in states:
        state.update((key, next(uploaded)) for key in list(state))


def to_cpu(obj, device):
    """obj (nested dicts, lists, tuples) with every tensor copied to the host. On XLA all of them in one
    transfer (one graph), instead of one per tensor."""
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        return xm._maybe_convert_to_cpu(obj)  # what xm.save uses: one sync, one batched transfer
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, device) for v in obj)
    return obj


def rng_states(device):
    """Every random generator a step can touch, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy = dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, cached=cached)
    states = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": numpy}
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        states["xla"] = xm.get_rng_state(device)
    elif device.type != "cpu":  # "cuda", "neuron", ...
        states[device.type] = torch.get_device_module(device).get_rng_state(device)
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(states["xla"], device)
    elif device.type != "cpu":
        torch.get_device_module(device).set_rng_state(states[device.type], device)


def seed_dropout(seed, par, device):
    """Dropout masks: a different stream per data-parallel replica, the same on a replica's tensor-parallel ranks (they
    must drop alike); called once the process group exists. Host generator: replica 0 goes on with the stream `seed`
    started (LoRA's initialisation drew from it alike everywhere), the others restart at seed + dp_rank. The device
    generator is seeded on every rank with seed + dp_rank: torch.manual_seed never reaches torch-xla's, and reaches
    TorchNeuron's only if its backend loaded before. (Both are saved with run checkpoints.)"""
    if par.dp_rank:
        torch.manual_seed(seed + par.dp_rank)
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed + par.dp_rank, device)
    elif device.type not in ("cpu", "meta"):  # cuda, neuron (torch.neuron mirrors torch.cuda), ...
        torch.get_device_module(device).manual_seed(seed + par.dp_rank)


def compile_layers(model, device):
    """trainer.compile: each decoder layer through torch.compile (fullgraph, static shapes), backend neuron on
    TorchNeuron, else inductor with torch's own dropout masks (fallback_random): resume stays exact."""
    if device.type == "xla":
        raise StageError("trainer.compile=true: on XLA the graphs are compiled by torch-xla already; set it false")
    backend = "neuron" if device.type == "neuron" else "inductor"
    if backend == "inductor":
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
    for layer in model.model.layers:
        layer.compile(backend=backend, fullgraph=True, dynamic=False)


def compile_counts(device, compiled):
    """What has been compiled so far, for the metrics: on XLA this process's graphs compiled, graph executions and
    device reads; with trainer.compile torch.compile's graphs. A count growing after the first steps is a recompile (or,
    on XLA, a step running more graphs than it should, or reading the device)."""
    if device.type == "xla":
        import torch_xla.debug.metrics as met

        names = {"xla_compiles": "CompileTime", "xla_executions": "ExecuteTime", "xla_reads": "TransferFromDeviceTime"}
        data = {name: met.metric_data(metric) or (0, 0.0) for name, metric in names.items()}  # (count, total ns, ...)
        return {name: int(d[0]) for name, d in data.items()} | {"xla_compile_s": data["xla_compiles"][1] / 1e9}
    if compiled:
        from torch._dynamo.utils import counters

        return {"compiled_graphs": int(counters["stats"]["unique_graphs"])}
    return {}


def cpu_fallback_ops(device):
    """Operations the device's backend ran on the CPU instead of the device (slow on Trainium), as torch-xla and
    TorchNeuron count them, host reads left out; none elsewhere."""
    if device.type == "neuron":
        import torch_neuronx

        return sorted(set(getattr(torch_neuronx, "get_fallback_ops", list)()))
    if device.type != "xla":
        return []
    import torch_xla.debug.metrics as met

    return sorted(op for op in met.executed_fallback_ops() if op != "aten::_local_scalar_dense")


# Per NeuronCore as a process sees it, from the chip datasheets: trn1, 2 NeuronCore-v2 per chip at 190 BF16 /
# 47.5 FP32 TFLOPS and 32 GiB; trn2, 4 logical cores per chip (LNC 2, the default) at 667 / 181 and 96 GiB;
# trn3, 4 logical cores per chip at 671 / 183 and 144 GiB. (bf16 TFLOPS, fp32 TFLOPS, GiB) per core.
NEURONCORE = {"trn1": (95, 23.75, 16), "trn2": (166.75, 45.25, 24), "trn3": (167.75, 45.75, 36)}
# dense (bf16 tensor core, fp32) TFLOPS per GPU
DATASHEET_TFLOPS = dict(
    H200=(989, 67), H100=(989, 67), A100=(312, 19.5), L40S=(362, 91.6), A10G=(125, 31.2), L4=(121, 30.3)
)


def logical_cores_per_core(gen):
    """How many physical NeuronCores one process's logical core spans: NEURON_LOGICAL_NC_CONFIG on trn2/trn3 (2 by
    default, 1 halves a process's memory and TFLOPS), always 1 on trn1."""
    return 1 if gen == "trn1" else int(os.environ.get("NEURON_LOGICAL_NC_CONFIG", "2"))


def neuron_datasheet(gen):
    """(bf16 TFLOPS, fp32 TFLOPS, GiB) of one process's NeuronCore: the table's LNC 2 figures scaled to the
    logical-core setting."""
    scale = logical_cores_per_core(gen) / (1 if gen == "trn1" else 2)
    return tuple(figure * scale for figure in NEURONCORE[gen])


def neuron_generation():
    """trn1, trn2 or trn3, from the instance type (trn1 when unknown)."""
    kind = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "")
    with contextlib.suppress(OSError):
        kind = kind or Path("/sys/devices/virtual/dmi/id/product_name").read_text()
    return next((g for g in ("trn3", "trn2") if g in kind), "trn1")


def peak_flops(device, autocast, configured):
    """The peak the MFU is measured against, and where it comes from: the config, a datasheet (GPU), or a
    large fp32 matrix product timed here (CPU)."""
    if configured:
        return configured * 1e12, "trainer.peak_tflops"
    kind, column = ("bf16", 0) if autocast else ("fp32", 1)  # the datasheets' (bf16, fp32) columns
    if device.type == "neuron" or (device.type == "xla" and os.environ.get("PJRT_DEVICE") == "NEURON"):
        gen = neuron_generation()
        lnc = f", LNC {logical_cores_per_core(gen)}" if gen != "trn1" else ""
        return neuron_datasheet(gen)[column] * 1e12, f"{gen} datasheet per NeuronCore{lnc}, {kind}"
    if device.type == "xla":
        return None, "XLA device without a datasheet figure; set trainer.peak_tflops"
    if device.type != "cpu":  # CUDA, XPU, ...: the device's own module names it
        name = torch.get_device_module(device).get_device_name(device)
        for key, tflops in DATASHEET_TFLOPS.items():
            if key in name:
                return tflops[column] * 1e12, f"{name} datasheet, {kind}"
        return None, f"{name}: no datasheet figure; set trainer.peak_tflops"
    a = b = torch.rand(2048, 2048, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.5:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - start), "measured: fp32 2048x2048 matmul on this CPU"


def peak_memory_gib(device):
    if device.type not in ("cpu", "xla"):  # CUDA, neuron, ...: torch.cuda's interface, through the device's module
        return torch.get_device_module(device).max_memory_allocated(device) / 2**30
    if device.type == "xla":
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(device)
        except Exception:  # not every XLA device reports memory
            return None
        used = info.get("peak_bytes_used", info.get("bytes_used"))
        return None if used is None else used / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def planned_trainium(c):
    """The Trainium generation this config trains on, without starting a device (as pick_device decides): XLA
    takes the checkpoint's hw_backend, TorchNeuron runs on trn2 or trn3; None elsewhere."""
    acc = c["trainer.accelerator"]
    if acc == "xla" or (acc == "auto" and importlib.util.find_spec("torch_xla") is not None):
        return c["distributed_strategy.hw_backend"]
    if acc == "neuron":
        return "trn3" if neuron_generation() == "trn3" else "trn2"
    return None


def device_memory(c):
    """(GiB per rank, where the figure comes from) for the device this config trains on."""
    if c["trainer.device_memory_gib"]:
        return c["trainer.device_memory_gib"], "trainer.device_memory_gib"
    gen, acc = planned_trainium(c), c["trainer.accelerator"]
    if gen:
        lnc = f", per logical core at LNC {logical_cores_per_core(gen)}" if gen != "trn1" else ""
        return neuron_datasheet(gen)[2], f"{gen} NeuronCore datasheet{lnc}"
    if acc in ("cuda", "auto") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / 2**30, props.name
    mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    per = int(os.environ.get("LOCAL_WORLD_SIZE", c["distributed_strategy.tensor_model_parallel_size"]))
    return mem["MemAvailable"] / 2**20 / per, f"available host memory / {per} process(es)"


# ------------------------------------------------------------------------------------------------ run checkpoints
# <run dir>/checkpoints/step_NNNNNNN/: adapter/ (PEFT, usable as is), rank_RRRRR.pt (each rank's LoRA shard,
# optimizer state and RNG states; never base weights) and trainer_state.json, written last, which lists every
# file with its size and sha256. A checkpoint is written under step_N.tmp and renamed once complete.
def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_run_checkpoint(run, done, skipped):
    """A run checkpoint after step `done`, written by every rank (a collective) under step_N.tmp and renamed when
    complete; the last save_top_k complete ones are kept. Rank 0 writes the PEFT adapter, then trainer_state.json."""
    c, par, gbs = run.c, run.par, run.c["data.global_batch_size"]
    state = dict(step=done, consumed_samples=done * gbs, skipped_steps=skipped, tensor_parallel=par.tp)
    state.update(data_parallel=par.dp, metrics_lines=run.metrics.lines, inputs=run.inputs)
    state["data"] = {"seed": c["seed"], "next_step": done, "windows": len(run.train), "global_batch_size": gbs}
    state["schedule"] = {"name": c["model.optim.sched.name"], "next_lr": lr_at(done, c)}
    lora, root = gather_lora(run.modules, par), run.dir / "checkpoints"
    final = root / f"step_{done:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    own = tmp / f"rank_{par.rank:05d}.pt"
    held = to_cpu({"lora": [p.detach() for p in run.params], "optimizer": run.optimizer.state_dict()}, run.device)
    torch.save(dict(held, rng=rng_states(run.device)), f"{own}.part")
    fsync_path(f"{own}.part")
    os.replace(f"{own}.part", own)
    par.barrier()
    if par.rank == 0:
        export_peft_adapter(lora, run.arch, c, tmp / "adapter")
        written = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in written}
        (tmp / "trainer_state.json").write_text(json.dumps(dict(state, files=files), indent=1) + "\n")
        for f in [*tmp.rglob("*"), tmp]:
            fsync_path(f)
        shutil.rmtree(final, ignore_errors=True)  # a broken checkpoint of the same step, from before a resume
        os.replace(tmp, final)
        fsync_path(root)
        own = own_checkpoints(root)
        complete = [p for p in own if p.suffix != ".tmp" and (p / "trainer_state.json").is_file()]
        keep = c["exp_manager.checkpoint_callback_params.save_top_k"]
        for old in complete[:-keep] + [p for p in own if p.suffix == ".tmp"]:  # and unfinished writes of killed runs
            shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    print(f"checkpoint: {final}")
    return final


def checkpoint_problem(path):
    """Why the checkpoint at `path` cannot be resumed from, or None if it is complete and intact."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (incomplete)"
    except json.JSONDecodeError:
        return "trainer_state.json is not valid JSON"
    for rel, entry in state["files"].items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != entry["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, trainer_state.json says {entry['bytes']}"
        if file_sha256(f) != entry["sha256"]:
            return f"{rel} does not match its sha256 in trainer_state.json"
    return None


def own_checkpoints(root):
    """The checkpoint directories this stage writes under `root`, oldest first: step_<digits> (.tmp while written);
    anything else (a copy of yours, step_0000100_best say) is never rotated, resumed from or removed."""
    found = [(int(m[1]), p) for p in Path(root).glob("step_*") if (m := re.fullmatch(r"step_(\d+)(\.tmp)?", p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir):
    """The newest complete, intact checkpoint of a run directory; broken ones are named in a warning."""
    for path in reversed(own_checkpoints(Path(run_dir) / "checkpoints")):
        problem = "an unfinished write (.tmp)" if path.name.endswith(".tmp") else checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    return None


def load_run_checkpoint(path, par, params, optimizer, device):
    """Restore this rank's LoRA shard, optimizer and RNG states; returns trainer_state.json."""
    state = json.loads((path / "trainer_state.json").read_text())
    if (state["tensor_parallel"], state["data_parallel"]) != (par.tp, par.dp):
        raise StageError(
            f"{path} was written by TP {state['tensor_parallel']} x DP {state['data_parallel']}; "
            f"resume with the same layout (this launch: TP {par.tp} x DP {par.dp})"
        )
    own = load_torch_file(path / f"rank_{par.rank:05d}.pt", mmap=False)
    if [tuple(p.shape) for p in params] != [tuple(s.shape) for s in own["lora"]]:
        raise StageError(
            f"{path}: its LoRA tensors have other shapes than this run's; it was written with other LoRA "
            f"settings (model_alignment_strategy.peft.*)"
        )
    with torch.no_grad():
        for p, saved in zip(params, own["lora"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(own["optimizer"])
    upload_optimizer_state(optimizer, device)
    set_rng_states(own["rng"], device)
    return state


FINISHED = "final/adapter/adapter_config.json"  # a finished run's last file (export_peft_adapter writes it last)


def resume_point(c, par):
    """Where this launch runs, decided by rank 0 before the model loads and shared with every rank: the run directory
    (explicit_log_dir, or with exp_manager.resume_if_exists the newest unfinished run of this experiment with a
    checkpoint, else a new one), the checkpoint to resume from, and what the launch changes. Nothing is created; a
    directory that is no run of this stage, or a resume that would not continue the same run, is refused (contents are
    compared once the data is prepared: same_inputs)."""
    where = None
    if par is None or par.rank == 0:
        key = "exp_manager.explicit_log_dir" if c["exp_manager.explicit_log_dir"] else "exp_manager.exp_dir"
        run_dir = Path(c["exp_manager.explicit_log_dir"]) if c["exp_manager.explicit_log_dir"] else None
        resume, experiment = c["exp_manager.resume_if_exists"], Path(c["exp_manager.exp_dir"]) / c["name"]
        if run_dir is None and resume:  # the newest unfinished run of this experiment that has a checkpoint
            unfinished = [d for d in sorted(experiment.glob("*")) if not (d / FINISHED).exists()]
            run_dir = next((d for d in reversed(unfinished) if own_checkpoints(d / "checkpoints")), None)
        run_dir = run_dir or experiment / time.strftime("%Y-%m-%d_%H-%M-%S")
        if run_dir.exists() and not run_dir.is_dir():
            raise StageError(f"{key}: {run_dir} is a file; the run directory must be a directory")
        if run_dir.is_dir() and any(run_dir.iterdir()) and not written_by_this_stage(run_dir / "config.yaml"):
            refuse_foreign(run_dir, key, "no config.yaml of this stage in it")
        check_writable(run_dir / "config.yaml", key)
        run_checkpoint = newest_checkpoint(run_dir) if resume else None
        reached = int(run_checkpoint.name.removeprefix("step_")) if run_checkpoint else 0
        check_own_adapter(run_dir / "final" / "adapter")  # a finished run trained on replaces it at the end
        if (run_dir / FINISHED).exists() and (run_checkpoint is None or reached >= c["trainer.max_steps"]):
            on = "raise trainer.max_steps to go on" if resume else "set exp_manager.resume_if_exists=true to go on"
            raise StageError(
                f"run directory {run_dir} holds a finished run (final/adapter); remove it, choose "
                f"another exp_manager.explicit_log_dir, or {on}"
            )
        if (run_dir / "metrics.jsonl").exists() and not resume:
            raise StageError(
                f"run directory {run_dir} already holds a run (metrics.jsonl); remove it, choose another "
                f"exp_manager.explicit_log_dir, or resume it with exp_manager.resume_if_exists=true"
            )
        changed = same_run_changes(run_dir, c) if run_checkpoint else {}
        where = (run_dir, run_checkpoint, changed, run_checkpoint is None and (run_dir / "metrics.jsonl").exists())
    return ResumePoint(*(where if par is None else par.broadcast(where)))


# Where a launch runs (resume_point): its run directory, the run checkpoint it resumes from (None: a new run), the
# resumable keys it changes ({key: [saved, now]}), whether it restarts from step 0 a run without a complete checkpoint.
ResumePoint = collections.namedtuple("ResumePoint", "dir checkpoint changed restart")


def run_inputs(c, train, val):
    """What a run trains on beyond its config, by content, keyed by the config key naming each and saved with every
    checkpoint: data files, tokenizer and base model (03's manifest.json of shard sha256s; else the shard sizes)."""
    base_dir = Path(c["exp_manager.resume_from_checkpoint"])
    manifest = base_dir / "manifest.json"
    shards = {p.name: p.stat().st_size for p in sorted((base_dir / "model").glob("*.pt"))}
    return {
        "data.train_dir": train.inputs["data_sha256"],
        "data.val_dir": val.inputs["data_sha256"] if val is not None else None,
        "data.tokenizer.type": text_sha256(train.inputs["tokenizer_sha256"]),
        "model.model_config": file_sha256(c["model.model_config"]),
        "exp_manager.resume_from_checkpoint": file_sha256(manifest) if manifest.exists() else text_sha256(shards),
    }


def same_run_changes(run_dir, c):
    """The resumable keys whose values differ from the run's saved config.yaml, as {key: [saved, now]}. A change
    to any other key is refused, each one listed with its saved and its new value."""
    flat = resolve(yaml.safe_load((run_dir / "config.yaml").read_text()), SCHEMA)
    changed = {k: [flat[k], v] for k, v in redacted(c).items() if flat[k] != v}
    sched = "model.optim.sched.max_steps"  # null means trainer.max_steps: the same decay either way
    if sched in changed and None in changed[sched]:
        old, new = changed[sched]
        if (flat["trainer.max_steps"] if old is None else old) == (c["trainer.max_steps"] if new is None else new):
            del changed[sched]
    refused = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items() if k not in RESUMABLE]
    if refused:
        raise not_the_same_run(run_dir, refused)
    return changed


def same_inputs(checkpoint, inputs):
    """A resumed run trains on the same content: the data, tokenizer and base checkpoint checksums that its
    checkpoint recorded must be today's."""
    trained_on = json.loads((checkpoint / "trainer_state.json").read_text())["inputs"]
    refused = [
        f"content of {k}: sha256 {str(old)[:12]}... -> {str(inputs.get(k))[:12]}..."
        for k, old in trained_on.items()
        if inputs.get(k) != old
    ]
    if refused:
        raise not_the_same_run(checkpoint.parents[1], refused)


def not_the_same_run(run_dir, changes):
    return StageError(
        f"{run_dir} holds a run trained with other settings, and a resumed run must be the same run: "
        f"{'; '.join(changes)}. Restore them, or start a new run (another exp_manager.explicit_log_dir); "
        f"config.yaml lists the keys that may change on resume"
    )


# ------------------------------------------------------------------------------------------------ pre-flight
# What the Neuron runtime holds on a NeuronCore besides the program's tensors: code (96 MB of micro-code per physical
# core), scratchpad, DMA rings, collective buffers ("Neuron device memory"); none published: 1 GiB is our allowance.
NEURON_RUNTIME_RESERVE_GIB = 1.0
ESTIMATE_ERROR = 0.2  # how far the estimate typically is from the measured peak (the dry run warns within it)


def check_shards(c, arch):
    """Every tensor-parallel shard: tensor names and shapes against config.json (on a meta-device model, so
    nothing is allocated), one floating dtype throughout, and that dtype against config.json's."""
    tp, base = c["distributed_strategy.tensor_model_parallel_size"], c["exp_manager.resume_from_checkpoint"]
    dtypes, layout = set(), layout_of(c, arch)
    for r in range(tp):
        par = Parallel(layout, torch.device("meta"), world=tp, rank=r, connect=False)
        with torch.device("meta"):
            model = Llama(arch, par=par)
        dtypes |= load_base_weights(model, base, c["model.fuse_qkv"], shard_layout(c))[1]
    raw = json.loads(Path(c["model.model_config"]).read_text())
    declared = raw.get("torch_dtype") or raw.get("dtype")
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise StageError(f"{base}: tensors of mixed or non-float dtypes {dtypes}")
    found = str(next(iter(dtypes))).removeprefix("torch.")
    if declared and declared != found:
        raise StageError(f"{base}: tensors are {found}, {c['model.model_config']} says {declared}")
    return found


def memory_estimate(arch, c, tp, supervised_per_row, trainium):
    """Bytes per rank, by component: frozen base shard, LoRA (weights, gradients, AdamW moments, fp32), activations of
    one micro-batch with and without per-layer checkpointing, and on Trainium the Neuron runtime's reserve. Activations
    count what autograd keeps per layer (norm outputs, q/k/v, attention output, gate/up/product) at the compute dtype,
    each RMSNorm's fp32 residual, LoRA A's fp32 outputs, with LoRA dropout each adapted input's dropped copy and mask,
    the attention matrix where no fused kernel runs (Trainium with a mask), the document mask, and the output layer's
    fp32 logits, softmax and gradient where logits are computed. Typically within 20%; fragmentation comes on top."""
    par = Parallel(layout_of(c, arch), torch.device("meta"), world=tp, rank=0, connect=False)
    with torch.device("meta"):
        model = Llama(arch, par=par)
    modules, params = add_lora(model, c, verbose=False)
    e = 2 if c["precision.type"] == "autocast" else 4
    b, s, h = c["data.micro_batch_size"], c["data.seq_length"], arch.hidden
    attn = model.model.layers[0].self_attn
    ql, kvl, hd, il = attn.heads, attn.kv_heads, arch.head_dim, arch.inter // tp
    r = c["model_alignment_strategy.peft.lora_rank"]
    per_layer = b * s * (2 * 4 * h + e * (2 * h + (2 * ql + 4 * kvl) * hd + 4 * il) + 4 * 4 * r)
    if c["model_alignment_strategy.peft.lora_dropout"] > 0:
        widths = {"qkv_proj": h, "o_proj": ql * hd, "gate_up_proj": h, "down_proj": il}
        targets = c["model_alignment_strategy.peft.target_modules"]
        per_layer += b * s * (e + 1) * sum(widths[t] for t in targets)
    if c["model_alignment_strategy.peft.use_dora"]:  # each adapted output kept twice more (the base and the update)
        outputs = {"qkv_proj": (ql + 2 * kvl) * hd, "o_proj": h, "gate_up_proj": 2 * il, "down_proj": h}
        per_layer += 2 * b * s * e * sum(outputs[t] for t in c["model_alignment_strategy.peft.target_modules"])
    if trainium:
        per_layer += b * ql * s * s * (e + 4)
    recomputed_layers = checkpointed_layers(c, arch)
    positions = b * s if trainium else b * supervised_per_row
    shared = b * s * s + positions * (arch.vocab // tp) * 4 * 3
    return {
        "frozen base": sum(p.numel() for p in model.parameters() if not p.requires_grad) * e,
        "LoRA weights, gradients, AdamW": sum(p.numel() for p in params) * 16,
        "runtime reserve": int(NEURON_RUNTIME_RESERVE_GIB * 2**30) if trainium else 0,
        "activations": arch.layers * per_layer + shared,
        "activations, checkpointed": (arch.layers - recomputed_layers + 1) * per_layer
        + recomputed_layers * b * s * h * e
        + shared,
    }


def dry_run(c, arch):
    """The plan of a run, and every check its inputs allow now; StageError on the first problem. Only model.model_config
    is needed: tokenizer, data and converted checkpoint are checked where they exist, named as skipped where not (memory
    then planned with every position supervised). It plans for the configured device from any host, opening none: trn1
    with trainer.accelerator=xla (the checkpoint's hw_backend), trn2/trn3 with neuron. A run directory a launch would
    refuse (a finished run, say) is reported after the plan."""
    try:
        where, refusal = resume_point(c, None), None
    except StageError as e:
        where, refusal = None, e
    # the most supervised positions of a training window: from the prepared data where tokenizer and data exist (a
    # broken tokenizer is refused as a run refuses it), else every position
    data, tok_dir = as_list(c["data.train_dir"]), Path(c["data.tokenizer.type"])
    supervised_per_row, skipped = c["data.seq_length"], []
    if tok_dir.exists() and all(Path(p).exists() for p in data):
        supervised_per_row = int(load_data(c, None, where)[1].supervised.max())
    else:
        tok_dir.exists() and load_tokenizer(c)
        skipped.append(
            f"tokenizer and data ({tok_dir}, {', '.join(data)}): not both there yet (planned: all supervised)"
        )
    base_dir, tp = Path(c["exp_manager.resume_from_checkpoint"]), c["distributed_strategy.tensor_model_parallel_size"]
    if any((base_dir / "model").glob("*.pt")):
        dtype = check_shards(c, arch)
        print(f"checkpoint: {tp} shard(s) in {base_dir}/model, every tensor present with the expected shape, {dtype}")
    else:
        skipped.append(f"checkpoint shards ({base_dir}/model): not converted yet (stage 03 writes them)")
    trainium = planned_trainium(c)
    limit, source = device_memory(c)
    est = memory_estimate(arch, c, tp, supervised_per_row, trainium is not None)
    plain, checkpointed = totals_gib(est)
    batch = f"micro-batch {c['data.micro_batch_size']} x {c['data.seq_length']}"
    print(f"memory per rank (estimate; TP {tp}, {batch}, {c['precision.type']}):")
    for k, v in est.items():
        print(f"  {k:<34} {v / 2**30:8.2f} GiB")
    print(f"  {'total without checkpointing':<34} {plain:8.2f} GiB")
    print(f"  {'total with checkpointing':<34} {checkpointed:8.2f} GiB")
    print(f"  device memory                      {limit:8.2f} GiB ({source})")
    print_plan(c, arch, supervised_per_row, trainium, limit)
    warn_tp_span(tp, trainium)
    for item in skipped:
        print(f"skipped: {item}")
    print(
        f"the estimate assumes no sequence parallelism (every rank keeps the activations of all positions) and "
        f"{'no fused attention (the attention scores are kept)' if trainium else 'SDPA as PyTorch runs it'}; its "
        f"{ESTIMATE_ERROR:.0%} margin comes from steps measured on the CPU (tests/test_dry_run.py), not on a device"
    )
    fits(c, plain, checkpointed, limit)
    if refusal is not None:
        raise StageError(f"the plan fits, but a launch would stop at its run directory: {refusal}")
    print(f"run directory: {where.dir}" + (f" (resumes from {where.checkpoint})" if where.checkpoint else ""))


def fits(c, plain, checkpointed, limit):
    """The verdict of the plan: an error when the configured run needs more than the device's memory, a warning
    when it is within the estimate's error of it."""
    on = c["model.activations_checkpoint"]
    need = checkpointed if on else plain
    if need > limit:
        hint = (
            f"; model.activations_checkpoint=true would bring it to {checkpointed:.2f} GiB"
            if not on and checkpointed <= limit
            else "; raise distributed_strategy.tensor_model_parallel_size or lower data.micro_batch_size / seq_length"
        )
        raise StageError(f"this run needs about {need:.2f} GiB per rank, the device has {limit:.2f} GiB{hint}")
    if need * (1 + ESTIMATE_ERROR) > limit:
        warn(
            f"{need:.2f} GiB is within the estimate's {ESTIMATE_ERROR:.0%} error of the device's {limit:.2f} GiB"
            + (f"; model.activations_checkpoint=true would need {checkpointed:.2f} GiB" if not on else "")
        )
    print(
        f"dry run: fits ({need:.2f} of {limit:.2f} GiB per rank with activation checkpointing "
        f"{'on' if on else 'off'}); nothing was trained"
    )


def totals_gib(est):
    """(GiB without activation checkpointing, GiB with it) of a memory_estimate."""
    fixed = est["frozen base"] + est["LoRA weights, gradients, AdamW"] + est["runtime reserve"]
    return (fixed + est["activations"]) / 2**30, (fixed + est["activations, checkpointed"]) / 2**30


def print_plan(c, arch, supervised_per_row, trainium, limit):
    """Memory per rank over every tensor-parallel size the heads allow (KV heads copied where TP exceeds them), with and
    without activation checkpointing, marked by whether it fits: the choice of TP before anything is converted."""
    print(f"plan: GiB per rank by tensor-parallel size (fits: under {limit:.2f} with {ESTIMATE_ERROR:.0%} to spare)")
    print("    TP  kv_replicator  without checkpointing  with checkpointing")
    mark = lambda gib: "fits" if gib * (1 + ESTIMATE_ERROR) <= limit else "tight" if gib <= limit else "no"  # noqa: E731
    for tp in range(1, arch.heads + 1):
        if arch.heads % tp or tp & (tp - 1):
            continue
        kv = max(1, tp // arch.kv_heads)
        planned = {**c, "distributed_strategy.tensor_model_parallel_size": tp, "distributed_strategy.kv_replicator": kv}
        try:
            layout_of(planned, arch).check().check_trainable()
        except StageError:
            continue
        plain, checkpointed = totals_gib(memory_estimate(arch, planned, tp, supervised_per_row, trainium is not None))
        this = "   <- this config" if tp == c["distributed_strategy.tensor_model_parallel_size"] else ""
        print(f"  {tp:4d}  {kv:13d}  {plain:9.2f} {mark(plain):<11}  {checkpointed:8.2f} {mark(checkpointed):<5}{this}")


def warn_tp_span(tp, trainium):
    """A tensor-parallel group's all-reduces, several per layer, should stay within one instance (between instances
    they cross EFA) and, on trn2/trn3, within one chip (NeuronLink otherwise)."""
    if trainium is None:
        return
    per_chip = 2 if trainium == "trn1" else 8 // logical_cores_per_core(trainium)  # 8 physical cores on trn2/trn3
    per_instance = per_chip * INSTANCE_CHIPS.get(trainium, 0)
    if per_instance and tp > per_instance:
        warn(
            f"TP {tp} spans {-(-tp // per_instance)} {trainium} instances ({per_instance} cores each): its "
            f"all-reduces, several per layer, cross EFA between them; keep TP <= {per_instance} and use the other "
            f"instances for data parallel"
        )
    elif trainium != "trn1" and tp > per_chip:
        warn(
            f"TP {tp} spans {-(-tp // per_chip)} {trainium} chips ({per_chip} logical cores per chip at "
            f"LNC {logical_cores_per_core(trainium)}): its all-reduces, several per layer, leave the chip; keep "
            f"TP <= {per_chip} where the model fits"
        )


INSTANCE_CHIPS = {"trn1": 16, "trn2": 16}  # trn1.32xlarge, trn2.48xlarge


# ------------------------------------------------------------------------------------------------ smoke run
# `--smoke`: the whole device path of a run on a tiny random Llama built in memory, against the same run on the CPU in
# fp32: a new platform judged in minutes, before a long compile of the real model. The runs go through main's own
# functions; only the weights are drawn, not loaded, and the data is random documents. Its settings, which overrides
# may change (the layout follows the world size: DP 2 from 4 even ranks, the rest TP, each KV head on two ranks):
SMOKE_SETTINGS = """\
name: smoke
seed: 1234
trainer: {accelerator: auto, compile: false, max_steps: 4, log_every_n_steps: 1, val_check_interval: 2,
  gradient_clip_val: 0.5, nonfinite: stop, peak_tflops: null, device_memory_gib: null}
exp_manager: {exp_dir: ., explicit_log_dir: null, resume_from_checkpoint: ., create_tensorboard_logger: false,
  resume_if_exists: true, checkpoint_callback_params: {every_n_train_steps: 2, save_top_k: 2}}
distributed_strategy: {tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1, kv_replicator: 1,
  hw_backend: trn1}
data: {train_dir: ., mix: null, val_dir: ., dev_choose_samples: null, seq_length: 64, micro_batch_size: 1,
  global_batch_size: 2, prompt_format: raw, truncation: truncate, train_reasoning: true, cache_dir: null,
  tokenizer: {type: .}}
model: {model_config: ., hf_weights_dir: ., fuse_qkv: false, weight_init_only: true, activations_checkpoint: false,
  activations_checkpoint_layers: null, attention: auto, optim: {lr: 0.01, weight_decay: 0.01, betas: [0.9, 0.999],
  eps: 1.0e-6, loraplus_lr_ratio: 4, sched: {name: linear, warmup_steps: 1, max_steps: null, min_lr: 0.0}}}
precision: {type: fp32}
model_alignment_strategy: {sft: {packing: true, neftune_noise_alpha: null}, peft: {lora_rank: 4, lora_alpha: 8,
  lora_dropout: 0.0, lora_bias: none, use_rslora: false, use_dora: true, lora_verbose: false,
  target_modules: [qkv_proj, o_proj, gate_up_proj, down_proj]}}
evaluation: {generate: {num_prompts: 0, max_new_tokens: 1, batch_size: 1, show: 0}}
xla: {cache_dir: null, neuron: {compiler_flags: --model-type transformer, compiler_cache_url: ~/neuron_cache,
  fuse_softmax: true, async_exec_max_inflight_requests: 5, rt_exec_timeout: 100, experimental_compress_rg: false}}
"""
# How far the device may be from the CPU's fp32 run, relatively (|device - cpu| / |cpu|; for the adapter the largest
# ||device - cpu|| / ||cpu|| over its tensors), per precision; a resumed run repeats the uninterrupted one. fp32: 10x
# and more above what XLA's CPU device and TP 2 x DP 2 under gloo give (1e-7 .. 1e-5). bf16 autocast: 5 to 10x the
# largest the CPU's own bf16 gives over seeds and layouts (loss 5e-4, grad_norm 8e-3, adapter 0.16: Adam's first steps
# move a weight by about the learning rate, so a gradient bf16 rounds to the other sign moves it the other way), far
# below what a wrong layout or reduction gives (about 1).
SMOKE_TOLERANCE = {
    "fp32": {"loss": 1e-4, "grad_norm": 1e-3, "val_loss": 1e-4, "adapter": 1e-3},
    "autocast": {"loss": 5e-3, "grad_norm": 5e-2, "val_loss": 5e-3, "adapter": 5e-1},
    "resume": {"loss": 1e-6, "grad_norm": 1e-5, "val_loss": 1e-6, "adapter": 1e-6},
}


def smoke(args):
    """Two runs on the device (4 steps with validations and checkpoints, then, in this process, a resume from step 2)
    and the same run on the CPU in fp32; prints the checks and each part's time, and fails if a check does."""
    if args.config:
        raise StageError("--smoke builds its own model and settings: give it overrides only, no --config")
    c, arch = smoke_settings(args.overrides)
    started = time.perf_counter()
    device, par = open_device(c, arch)
    times = {"start: device, process group, self-check": time.perf_counter() - started}
    scratch = Path(par.broadcast(tempfile.mkdtemp(prefix="smoke_") if par.rank == 0 else None))
    data = smoke_windows(arch, c, 48, 1), smoke_windows(arch, c, 8, 2)
    cpu = dict(c, **{"trainer.accelerator": "cpu", "precision.type": "fp32", "trainer.compile": False})
    cpu.update({"distributed_strategy.tensor_model_parallel_size": 1, "distributed_strategy.kv_replicator": 1})
    one = Parallel(layout_of(cpu, arch), torch.device("cpu"), world=1)
    print(
        f"smoke run on {device} ({c['precision.type']}, TP {par.tp} x DP {par.dp}): a random Llama of "
        f"{arch.layers} layers, hidden {arch.hidden}, {arch.heads} Q / {arch.kv_heads} KV heads, LoRA with DoRA and "
        f"LoRA+, against the CPU in fp32; log: {scratch / 'smoke.log'}"
    )
    runs = {}
    plan = [
        ("device run: 4 steps, 3 validations, 2 checkpoints, export", c, device, par, None),
        ("resumed from its step 2 checkpoint: 2 steps, export", c, device, par, "checkpoints/step_0000002"),
        ("the same run on the CPU in fp32, one process", cpu, torch.device("cpu"), one, None),
    ]
    with open(scratch / "smoke.log", "a") as log, contextlib.redirect_stdout(log):
        for i, (part, settings, where, layout, checkpoint) in enumerate(plan[: 3 if par.rank == 0 else 2]):
            started = time.perf_counter()
            resume_from = scratch / "run0" / checkpoint if checkpoint else None
            runs[i] = smoke_run(settings, arch, where, layout, data, scratch / f"run{i}", resume_from)
            times[part] = time.perf_counter() - started
    failed = 0
    if par.rank == 0:
        rows = smoke_checks(c, runs[0], runs[1], runs[2])
        key = "xla_compiles" if device.type == "xla" else "compiled_graphs" if c["trainer.compile"] else None
        if key:  # what must stay at zero: graphs the resumed run compiled anew, operators run on the CPU
            new = runs[1][0][-1][key] - runs[0][0][-1][key]
            rows.append(("resumed: graphs compiled anew", new, 0, float(new), 0.0))
        if device.type in ("xla", "neuron"):
            fallbacks = cpu_fallback_ops(device)
            rows.append(("operators run on the CPU", ", ".join(fallbacks) or "none", "none", len(fallbacks), 0.0))
        failed = print_smoke(rows, times, runs[0][0], data[0], c)
    if par.any_rank(failed):
        print(f"smoke run: {scratch} keeps the runs and smoke.log")
        raise StageError(f"smoke run: {failed or 'some'} check(s) failed (marked FAIL above)")
    par.barrier()
    if par.rank == 0:
        shutil.rmtree(scratch)


def smoke_settings(overrides):
    """SMOKE_SETTINGS with the overrides, laid out for the launched world size: data parallel 2 from 4 even ranks,
    the rest tensor parallel, with 2 Q heads per rank and each KV head on two ranks; and the model that fits."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = 2 if world >= 4 and world % 2 == 0 else 1
    tp = world // dp
    arch = Arch(vocab=96 * tp, hidden=64, inter=32 * tp, layers=2, heads=2 * tp, kv_heads=max(1, tp // 2), head_dim=16)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "smoke.yaml").write_text(SMOKE_SETTINGS)
        c = resolve(load_config([Path(d) / "smoke.yaml"], overrides), SCHEMA)
    c["distributed_strategy.tensor_model_parallel_size"] = tp
    c["distributed_strategy.kv_replicator"] = tp // arch.kv_heads
    c["data.global_batch_size"] = 2 * dp * c["data.micro_batch_size"]
    return c, arch


def smoke_windows(arch, c, n, seed):
    """Windows of n random documents of 4 to seq_length / 2 tokens, the first third of each a prompt."""
    g = np.random.default_rng(seed)
    docs = []
    for length in g.integers(4, max(5, c["data.seq_length"] // 2), n).tolist():
        ids = g.integers(1, arch.vocab, length).tolist()
        docs.append((ids, [-100] * (length // 3) + ids[length // 3 :]))
    return Windows.from_docs(docs, c["data.seq_length"], c["model_alignment_strategy.sft.packing"], 0)


def smoke_weights(model, seed):
    """Random base weights, each tensor drawn at full size from a generator of its own and cut as this rank's layout
    holds it, so that every rank and the CPU's single process hold one model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                full = torch.randn(m.full, generator=g) / math.sqrt(m.full[1])
                m.weight.copy_(full[m.index] if m.parallel == "column" else full[:, m.index])
            elif isinstance(m, VocabEmbedding):
                full = torch.randn(model.arch.vocab, model.arch.hidden, generator=g)
                m.weight.copy_(full[m.par.tp_rank * m.rows : (m.par.tp_rank + 1) * m.rows])
            elif isinstance(m, RMSNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))


def smoke_run(c, arch, device, par, data, run_dir, checkpoint=None):
    """One run as main runs it (evaluation, steps, checkpoints, the final evaluation and export), or its resume from
    `checkpoint`. Returns rank 0's metrics records and exported adapter tensors (nothing on other ranks)."""
    torch.manual_seed(c["seed"])  # LoRA's A, drawn alike by every run
    model = new_model(c, arch, device, par)
    smoke_weights(model, c["seed"])
    sync_device(device)
    model, modules, params = adapt_model(model, c, device, par)
    autocast = c["precision.type"] == "autocast"
    run = Run(c, arch, device, par, model, modules, params, autocast, None, *data, [], False, {}, run_dir)
    train_run(run, ResumePoint(dir=run_dir, checkpoint=checkpoint, changed={}, restart=False), ["config.yaml"])
    if par.rank != 0:
        return [], {}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(run_dir / "final" / "adapter" / "adapter_model.safetensors")


def smoke_checks(c, whole, resumed, reference):
    """(check, device value, expected value, relative difference, tolerance) rows: the device's run against the CPU's
    fp32 run, and the resumed run against the uninterrupted one."""
    rows = []
    for prefix, (records, adapter), (expected, expected_adapter), tolerance in (
        ("", whole, reference, SMOKE_TOLERANCE[c["precision.type"]]),
        ("resumed: ", resumed, whole, SMOKE_TOLERANCE["resume"]),
    ):
        want = {(r["step"], k): r[k] for r in expected for k in tolerance if k in r}
        for r in records:
            for k in tolerance:
                if (r["step"], k) in want and k in r:
                    got, ref = r[k], want[r["step"], k]
                    diff = math.inf if None in (got, ref) else abs(got - ref) / max(abs(ref), 1e-30)
                    rows.append((f"{prefix}{k}, step {r['step']}", got, ref, diff, tolerance[k]))
        worst = max(float((adapter[n] - t).norm() / t.norm().clamp(min=1e-30)) for n, t in expected_adapter.items())
        rows.append((f"{prefix}adapter, {len(adapter)} tensors", "", "", worst, tolerance["adapter"]))
    return rows


def print_smoke(rows, times, records, train, c):
    """The table of checks, then the time of each part, the device run's first step (which compiles) apart from a
    later one; returns the number of failed checks."""
    print(f"{'check':<32} {'device':>12} {'expected':>12} {'difference':>10} {'tolerance':>9}  result")
    failed = 0
    for check, got, want, diff, tolerance in rows:
        failed += diff > tolerance
        got, want = (f"{v:.6g}" if isinstance(v, float) else str(v) for v in (got, want))
        ok = "ok" if diff <= tolerance else "FAIL"
        print(f"{check:<32} {got:>12} {want:>12} {diff:>10.1e} {tolerance:>9.0e}  {ok}")
    gbs, steps = c["data.global_batch_size"], [r for r in records if "loss" in r]
    seconds = [
        float(train.n_tokens[step_indices(r["step"] - 1, train.sources, gbs, c["seed"])].sum()) / r["tokens_per_s"]
        for r in steps
    ]
    parts = list(times.items())
    parts[2:2] = [("  its first step, which compiles what it runs", seconds[0]), ("  a later step", min(seconds[1:]))]
    if "xla_compile_s" in records[-1]:
        parts[4:4] = [("  compilation, as torch-xla measured it (this process)", records[-1]["xla_compile_s"])]
    for part, t in parts:
        print(f"{part:<60} {t:8.2f} s")
    print(f"smoke run: {len(rows) - failed} of {len(rows)} checks passed")
    return failed


# ------------------------------------------------------------------------------------------------ throughput
def window_flops(windows, arch):
    """Model FLOPs of training on each window, LoRA convention: 4 x weights per token (forward + input-gradient
    backward; frozen weights get no weight-gradient GEMM; LoRA's small GEMMs uncounted), the output layer at supervised
    positions only (the only ones with logits), plus attention (QK^T, AV, forward and backward) over the keys each token
    attends to. Padding is not counted."""
    h, hd, heads, kv = arch.hidden, arch.head_dim, arch.heads, arch.kv_heads
    body = arch.layers * (h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * arch.inter)
    attention = 3.0 * 4 * arch.layers * heads * hd * windows.keys
    return 4.0 * body * windows.n_tokens + 4.0 * h * arch.vocab * windows.supervised + attention


# ------------------------------------------------------------------------------------------------ records
# The parts of stage 01's record reader that 05 uses on the records 01 wrote (the same text, tests/test_config.py).
MESSAGE_KEYS = dict(system="", user="", assistant="tool_calls reasoning_content train", tool="tool_call_id name")


class BadRecord(Exception):
    """A record that cannot be trained on: `kind` is a short category (counted in 01's manifest), `reason` the
    whole explanation."""

    def __init__(self, kind, reason):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def first_line(e):
    return str(e).splitlines()[0] if str(e) else ""


def parse_row(item):
    """The record of one item of a data file: a JSON line (bytes) decoded and parsed, or a table's record itself."""
    if isinstance(item, bytes):
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(
                "not UTF-8", f"not UTF-8 text (byte 0x{item[e.start]:02x} at byte {e.start + 1} of the line)"
            ) from None
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord("not valid JSON", f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(item).__name__}")
    return item


def check_conversation(messages, tools=None):
    """The record {"messages": [...], "tools": [...] (when given)} of a conversation, checked. A message holds its
    role, content and the keys MESSAGE_KEYS allows it: an assistant's "tool_calls" (which may stand for its content),
    "reasoning_content" and a boolean "train"; a tool result's "tool_call_id" and "name" (check_function for calls
    and tools). A system turn comes first if any, a user turn before the first assistant turn, a tool result after a
    tool call, no turn is empty, and an assistant turn that trains ends it."""

    def bad(why, kind="bad conversation"):
        return BadRecord(kind, why)

    if not isinstance(messages, list) or not messages:
        raise bad("a conversation must be a non-empty list of messages")
    # columnar files hold null for a key that some messages lack
    messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    for i, m in enumerate(messages, start=1):
        role = m.get("role") if isinstance(m, dict) else f"none: a {type(m).__name__}, not an object"
        if role not in MESSAGE_KEYS:
            raise bad(f"message {i}: unknown role {role!r} (known: {', '.join(MESSAGE_KEYS)})")
        allowed, previous = MESSAGE_KEYS[role].split(), messages[i - 2] if i > 1 else {}
        if not set(m) - {"role", "content"} <= set(allowed) or not {"content", "tool_calls"} & set(m):
            raise bad(
                f"message {i} ({role}) must have 'content', and may have {allowed or 'nothing else'}: {sorted(m)}"
            )
        for key in ("content", "reasoning_content", "tool_call_id", "name"):
            if not isinstance(m.get(key, ""), str):
                raise bad(f"message {i}: {key} must be a string, got {type(m[key]).__name__}")
        if not (m.get("content", "").strip() or m.get("tool_calls") or role == "tool"):
            raise bad(f"message {i} ({role}) is empty", "empty turn")
        if role == "system" and i != 1:
            raise bad(f"message {i}: a system message may only come first")
        if role == "tool" and previous.get("role") != "tool" and "tool_calls" not in previous:
            raise bad(f"message {i}: a tool result must follow a tool call or a result")
        if not isinstance(m.get("train", True), bool):
            raise bad(f"message {i}: 'train' must be true or false")
        calls = m.get("tool_calls", [])  # a list of one call or more
        for k, call in enumerate(calls if isinstance(calls, list) and (calls or "tool_calls" not in m) else [calls], 1):
            check_function(call, f"message {i}: tool call {k}", {"id"})
    if not isinstance(tools, list | None):
        raise bad(f"'tools' must be a list of tool schemas, got {type(tools).__name__}", "bad tool")
    for k, tool in enumerate(tools or [], start=1):
        check_function(tool, f"'tools' item {k}", set())
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise bad("a conversation without an assistant turn has nothing to train on", "no assistant turn")
    if roles[-1] != "assistant":
        raise bad(f"the conversation ends on a {roles[-1]} turn, after its last answer", "ends on a user turn")
    if next(r for r in roles if r != "system") != "user":
        raise bad("the first turn after the system message must be the user's")
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        raise bad('every assistant turn has "train": false: nothing to train on', "no assistant turn")
    return {"messages": [dict(m) for m in messages], **({"tools": tools} if tools is not None else {})}


def check_function(x, where, keys):
    """A tool call or schema: {"type": "function", "function": {"name": str, ...}}, arguments an object, or `keys`."""
    fn = x.get("function") if isinstance(x, dict) else None
    shaped = isinstance(fn, dict) and x.get("type") == "function" and set(x) <= {"type", "function", *keys}
    if not (shaped and isinstance(fn.get("name"), str) and fn["name"] and isinstance(fn.get("arguments", {}), dict)):
        shape = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
        raise BadRecord("bad tool", f"{where} must be {shape}, got {json.dumps(x, default=str)[:160]}")


# ------------------------------------------------------------------------------------------------ shared
# Helpers repeated at the end of every stage so that each stage can be copied alone: each stage carries those it
# calls, and tests/test_config.py keeps every copy of one identical, by name. STAGE (the stage's file name) is
# defined by each stage in its settings section.
class StageError(Exception):
    """Bad input: reported as one line on stderr with exit status 1; no partial output is left behind."""


def load_config(paths, overrides):
    """Overlay the YAML files in order, then `dotted.key=value` overrides; the first file defines the keys."""
    cfg = None
    for path in paths:
        try:
            data = yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)
        except FileNotFoundError:
            raise StageError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise StageError(f"{path}: is a directory, expected a YAML config file") from None
        except yaml.YAMLError as e:
            raise StageError(f"{path}:{yaml_error_place(e)} not valid YAML ({yaml_error_reason(e)})") from None
        if not isinstance(data, dict):
            raise StageError(f"{path}: expected a mapping of config sections at the top level")
        cfg = data if cfg is None else overlay(cfg, data, path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StageError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise StageError(f"override {item!r}: the value is not valid YAML ({yaml_error_reason(e)})") from None
        for part in reversed(key.split(".")):
            value = {part: value}
        overlay(cfg, value, "command line")
    return cfg


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML would keep the last one silently:
    a second `trainer:` section would drop the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' written twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_error_place(e):
    """'line:column:' of a YAML error (1-based), or '' when PyYAML gives no position."""
    mark = getattr(e, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def yaml_error_reason(e):
    """PyYAML's problem, and where the construct it was reading began when that is elsewhere."""
    reason = " ".join(str(getattr(e, "problem", None) or e).split())
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and mark is not None and mark.line != getattr(getattr(e, "problem_mark", None), "line", None):
        reason += f"; {context} that began at line {mark.line + 1}, column {mark.column + 1}"
    return reason


def overlay(base, new, source, prefix="", root=None):
    """Merge `new` into `base` in place; a key that `base` lacks is an error (typos never pass silently) that
    names the closest known keys."""
    root = base if root is None else root
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise StageError(f"{source}: unknown key '{key}'{did_you_mean(str(k), base, prefix, root)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise StageError(f"{source}: '{key}' is a section; set its keys instead ({key}.<name>=...)")
            overlay(base[k], v, source, key + ".", root)
        else:
            base[k] = v
    return base


def did_you_mean(name, section, prefix, root):
    """'; did you mean ...?' naming keys of the same section spelled alike, or keys of that name elsewhere."""
    import difflib

    def dotted(node, pre=""):
        for k, v in node.items():
            yield from dotted(v, f"{pre}{k}.") if isinstance(v, dict) else [f"{pre}{k}"]

    near = [prefix + m for m in difflib.get_close_matches(name, [str(k) for k in section], n=3, cutoff=0.7)]
    if not near:
        keys = list(dotted(root))
        leaves = difflib.get_close_matches(name, {k.rsplit(".", 1)[-1] for k in keys}, n=2, cutoff=0.8)
        near = [k for k in keys if k.rsplit(".", 1)[-1] in leaves][:3]
    return f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""


def resolve(cfg, schema):
    """{dotted key: value} for the keys this stage reads, each checked against its type and range; paths expanded.
    A spec is a type, optionally followed by a range. Types: int, float, bool, str, path (str with ~ and ${ENV}
    expanded), list[str], list[float], a|b|c (one of these strings); str+ and path+ also take a non-empty list of
    them (kept as a list); a trailing ? allows null. Ranges: '>= 1', '> 0', 'in [0, 1)' (brackets as in
    mathematics), checked for numbers and for every item of a list."""
    out = {}
    for key, spec in schema.items():
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise StageError(f"config: missing key '{key}' (expected {spec})")
            node = node[part]
        kind, _, bounds = spec.partition(" ")
        nullable, kind = kind.endswith("?"), kind.rstrip("?")
        if kind.endswith("+") and isinstance(node, list) and node and all(isinstance(v, str) for v in node):
            out[key] = [os.path.expanduser(os.path.expandvars(v)) if kind == "path+" else v for v in node]
            continue
        kind = kind.rstrip("+")
        if node is None:
            if not nullable:
                raise StageError(f"config: '{key}' must be {kind}, got null")
        elif "|" in kind:
            if node not in kind.split("|"):
                raise StageError(f"config: '{key}' must be one of {kind.split('|')}, got {node!r}")
        elif kind.startswith("list["):
            item = {"list[str]": str, "list[float]": (int, float)}[kind]
            if not isinstance(node, list) or not all(isinstance(x, item) and not isinstance(x, bool) for x in node):
                raise StageError(f"config: '{key}' must be {kind}, got {node!r}")
            if bounds and not all(within(x, bounds) for x in node):
                raise StageError(f"config: every item of '{key}' must be {bounds}, got {node!r}")
        else:
            if kind == "float" and isinstance(node, str):
                try:  # YAML reads 1e-6 (no dot) as a string; a number is clearly meant
                    node = float(node)
                except ValueError:
                    pass
            types = {"int": int, "float": (int, float), "bool": bool, "str": str, "path": str}[kind]
            if not isinstance(node, types) or (isinstance(node, bool) and kind != "bool"):
                raise StageError(f"config: '{key}' must be {kind}, got {type(node).__name__} {node!r}")
            if kind == "float":
                node = float(node)
            if bounds and not within(node, bounds):
                raise StageError(f"config: '{key}' must be {bounds}, got {node!r}")
            if kind == "path":
                node = os.path.expanduser(os.path.expandvars(node))
                if "$" in node:
                    raise StageError(f"config: '{key}': an environment variable in {node!r} is not set")
        out[key] = node
    return out


def within(x, bounds):
    """x satisfies a range of the schema: '>= a', '> a' or 'in [a, b)' with either bracket at either end; never an
    infinity or NaN."""
    if not -float("inf") < x < float("inf"):
        return False
    if bounds.startswith(">"):
        op, limit = bounds.split()
        return x >= float(limit) if op == ">=" else x > float(limit)
    lo, hi = bounds.removeprefix("in ").split(", ")
    return (x >= float(lo[1:]) if lo[0] == "[" else x > float(lo[1:])) and (
        x <= float(hi[:-1]) if hi[-1] == "]" else x < float(hi[:-1])
    )


def redacted(c):
    """The resolved config with anything that looks like a secret masked, for printing and saving."""
    secret = {"token", "secret", "password", "credential", "credentials"}
    return {k: ("***" if secret & set(k.lower().replace("_", ".").split(".")) and v else v) for k, v in c.items()}


def show_settings(c, paths, overrides, schema):
    """Print, section by section, the keys whose value differs from the first config file's (config.yaml in
    every documented command): what this launch changes. The whole resolved config is saved beside outputs."""
    try:
        base = redacted(resolve(load_config(paths[:1], []), schema))
    except StageError:
        base = {}
    changed = {k: v for k, v in redacted(c).items() if k not in base or base[k] != v}
    given = " + ".join(str(p) for p in paths) + (f" + {len(overrides)} override(s)" if overrides else "")
    print(f"settings: {given}" + (f"; differing from {paths[0]}:" if changed else f" (as {paths[0]})"))

    def shown(v):  # as YAML reads it
        if isinstance(v, list):
            return f"[{', '.join(map(shown, v))}]"
        return v if isinstance(v, str) else json.dumps(v)

    sections = {}
    for key, value in changed.items():
        section, _, rest = key.partition(".")
        sections.setdefault(section if rest else "", []).append(f"{rest or section}={shown(value)}")
    for section, items in sections.items():
        line = f"  {section + ': ' if section else ''}"
        for item in items:
            if len(line) + len(item) > 118 and line.strip():
                print(line.rstrip())
                line = "    "
            line += item + " "
        print(line.rstrip())


def save_config(c, path, files=()):
    """Write the resolved config (nested YAML, secrets masked) next to an output, atomically. Its first line
    names the stage, which is how a stage recognises an output as its own (written_by_this_stage); `files`, the
    files the output consists of, are listed as files_written, so that a later run replaces those only."""
    nested = {}
    for key, value in redacted(c).items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    listed = yaml.safe_dump({"files_written": sorted(files)}) if files else ""
    header = f"# written by {STAGE}: the resolved config of this output\n"
    write_atomically(path, header + yaml.safe_dump(nested, sort_keys=False) + listed)


def written_by_this_stage(config_path):
    """True when `config_path` is a resolved config that this stage saved (see save_config)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            return f.readline().startswith(f"# written by {STAGE}:")
    except (OSError, UnicodeDecodeError):
        return False


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line StageErrors (exit status 1) that suggest the closest option."""

    def error(self, message):
        import difflib

        hint = ""
        for arg in message.partition("unrecognized arguments: ")[2].split():
            near = difflib.get_close_matches(arg, list(self._option_string_actions), n=1, cutoff=0.6)
            hint += f"; did you mean {near[0]!r} for {arg!r}?" if near else ""
        raise StageError(f"{message}{hint} (see --help)")


def config_arg_parser(doc):
    """--config (repeatable, later files overlay earlier ones) and key=value overrides; --help shows `doc`."""
    ap = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", action="append", metavar="PATH", help="YAML config; repeat to overlay (default: config.yaml)"
    )
    ap.add_argument(
        "overrides", nargs="*", metavar="dotted.key=value", help="config overrides (before or after the options)"
    )
    return ap


def check_writable(path, key):
    """Pre-flight: `path` (an output that may not exist yet) can be created: its nearest existing ancestor is a
    directory that this process may write to. Nothing is created."""
    here = Path(path).absolute().parent
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise StageError(f"{key}: cannot write {path}: {here} is a file, not a directory")
    if not os.access(here, os.W_OK | os.X_OK):
        raise StageError(f"{key}: cannot write {path}: {here} is not writable")


def refuse_foreign(path, key, reason):
    """An output path holds something this stage did not write: it is never replaced, so the stage stops."""
    raise StageError(
        f"{key}: {path} exists and was not written by {STAGE} ({reason}); it is left as it is: move "
        f"it away or choose another path"
    )


def file_sha256(path):
    """Hex sha256 of a file, read in 16 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(path, text):
    """A small text file written under <path>.tmp, then renamed: a reader never sees half of it."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_torch_file(path, mmap=True):
    """A file written by torch.save, loaded as plain tensors and containers only (weights_only: no code runs)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise StageError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------------------ entry point
if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():  # on success: Gloo's threads outliving the interpreter can abort the exit (SIGABRT)
            dist.destroy_process_group()
    except StageError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # outside the training steps (there, Ctrl-C finishes the step and checkpoints)
        sys.exit("stopped by Ctrl-C; every output is written whole or not at all")
