"""Trace, without executing, the graphs one rank of a TP 2 x DP 2 run would build; print them as JSON.

A single XLA process cannot execute a collective of four replicas, but it can trace one: with four CPU devices
(CPU_NUM_DEVICES=4) and XLA_ALWAYS_ALLREDUCE=1 torch-xla builds the all-reduce and all-gather ops with their
replica groups. Run by tests/test_xla.py as `python xla_trace_rank.py RANK`, one process per rank (torch-xla
threads a token through collectives, so traces of several ranks in one process would chain together)."""

import json
import sys
from pathlib import Path

import torch
import torch_xla

sys.path.insert(0, str(Path(__file__).parent))
from conftest import load_stage  # noqa: E402

# A tiny model with one KV head copied to both tensor-parallel ranks (kv_replicator 2), so that the replicated
# K/V gradient reduction is traced too.
ARCH = dict(
    vocab=384,
    hidden=64,
    inter=96,
    layers=2,
    heads=4,
    kv_heads=1,
    head_dim=16,
    eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    tie=False,
)
TP, WORLD = 2, 4


def trace(rank):
    train = load_stage("05_train.py")
    c = train.resolve(
        train.load_config(
            [str(Path(__file__).parents[1] / "config.yaml")],
            ["model_alignment_strategy.peft.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]"],
        ),
        train.SCHEMA,
    )
    device = torch_xla.device()
    par = train.Parallel(
        train.Layout(train.Arch(**ARCH), TP, kv_mult=2, hw_backend="trn1"),
        device,
        world=WORLD,
        rank=rank,
        connect=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = train.Llama(train.Arch(**ARCH), torch.float32, par)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    modules, params = train.add_lora(model, c, verbose=False)
    ids = torch.randint(0, ARCH["vocab"], (1, 16), generator=torch.Generator().manual_seed(par.dp_rank))
    mb = {
        "input_ids": ids,
        "targets": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1),
        "position_ids": torch.arange(16)[None],
        "segment_ids": torch.ones(1, 16, dtype=torch.long),
    }
    # One micro-batch and the end of the step, as 05's loop runs them (without executing anything).
    loss = train.loss_sum(model, mb, device, False) * torch.tensor(0.1, device=device)
    loss.backward()
    train.sync_gradients(modules, params, par)
    norm = train.global_grad_norm(modules, par)
    step_loss = par.all_reduce(loss.detach(), "dp")
    bad = train.nonfinite(torch.stack([step_loss, norm]))
    step = torch_xla._XLAC._get_xla_tensors_hlo([p.grad for p in params] + [norm, step_loss, bad])
    # The adapter export's gather: one flat vector of every LoRA tensor.
    flat = torch.cat([p.detach().float().flatten() for p in params])
    export = torch_xla._XLAC._get_xla_tensors_hlo([torch.stack(par.all_gather(flat, "tp"))])
    return {"step": step, "export": export, "tp_rank": par.tp_rank, "dp_rank": par.dp_rank}


if __name__ == "__main__":
    print(json.dumps(trace(int(sys.argv[1]))))
