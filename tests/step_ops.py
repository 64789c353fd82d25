"""The aten operators one training step of 05 dispatches as an accelerator runs it, for tests/test_accelerator.py.

The step is 05's own (train_step, apply_update with DeviceAdamW, the log interval, a validation pass and the adapter
gather) on the smoke run's tiny model with every feature on (DoRA, LoRA+, dropout, NEFTune, activation checkpointing,
clipping), taken down the accelerator's path: whole rows, logits at every position, float32 sums (compiles_per_shape
answers True), masked attention through SDPA's math path, which every device can take. In one process it traces
TP 1; under `torchrun --nproc_per_node 2 tests/step_ops.py PRECISION` it traces TP 2 (gloo) and prints the operators
as JSON."""

import json
import os
import sys
from pathlib import Path

import torch
from torch._C import DispatchKey
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from conftest import load_stage  # noqa: E402

FEATURES = [
    "model_alignment_strategy.peft.lora_dropout=0.1",
    "model_alignment_strategy.sft.neftune_noise_alpha=5",
    "model.activations_checkpoint=true",
    "model.attention=masked",
    "trainer.gradient_clip_val=0.01",
]


class Recorder(TorchDispatchMode):
    """Every aten operator dispatched, as the chain of calls that reached it: an operator with a device-generic
    kernel (CompositeExplicitAutograd, or the NonFunctional one of structured operators) is run through it, and the
    operators it calls in turn are recorded below it ("aten::rand > aten::uniform_"): a device without a kernel of
    its own for the outer operator receives them."""

    GENERIC = (DispatchKey.CompositeExplicitAutograd, DispatchKey.CompositeExplicitAutogradNonFunctional)

    def __init__(self):
        super().__init__()
        self.chains, self.stack = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten":
            return func(*args, **kwargs)
        self.chains.add(" > ".join([*self.stack, func.name()]))
        generic = [k for k in self.GENERIC if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), k)]
        if not generic or func.name() in self.stack:  # (a generic kernel may call its own operator again)
            return func(*args, **kwargs)
        self.stack.append(func.name())
        try:
            with self:
                return func._op_dk(generic[0], *args, **kwargs)
        finally:
            self.stack.pop()


def traced_step_ops(train, precision):
    """The set of aten operator names (aten::name.overload) of one accelerator-path step and its evaluation."""
    train.compiles_per_shape = lambda device: True  # the path of every device that compiles per shape
    c, arch = train.smoke_settings([*FEATURES, f"precision.type={precision}"])
    device = torch.device("cpu")
    par = train.Parallel(train.layout_of(c, arch), device)
    torch.manual_seed(c["seed"])
    model = train.new_model(c, arch, device, par)
    train.smoke_weights(model, c["seed"])
    model, modules, params = train.adapt_model(model, c, device, par)
    windows = train.smoke_windows(arch, c, 16, 1)
    gbs, mbs = c["data.global_batch_size"], c["data.micro_batch_size"]
    run = train.Run(
        c,
        arch,
        device,
        par,
        model,
        modules,
        params,
        precision == "autocast",
        None,
        windows,
        windows,
        [],
        False,
        {},
        Path("."),
    )
    run.optimizer = train.DeviceAdamW(train.optimizer_groups(modules, c), lr=1e-2)
    interval = train.LogInterval(windows, arch, c["seed"], gbs, device, 0, 0)
    loader = iter(list(train.micro_batches(windows, 0, 1, gbs, mbs, c["seed"], par)))  # built on the host
    with sdpa_kernel(SDPBackend.MATH), Recorder() as recorder:
        step_loss, grad_norm, bad = train.train_step(run, loader)
        train.apply_update(run, 1e-2, grad_norm, bad)
        interval.add(0, step_loss, grad_norm, bad)
        train.evaluate(model, windows, mbs, device, run.autocast)
        # gather_lora's device part (it reassembles the tensors on the host)
        flat = torch.cat([t.detach().float().flatten() for _, m in modules for t in train.lora_factors(m)])
        torch.stack(par.all_gather(flat, "tp"))
    return recorder.chains


if __name__ == "__main__":
    import torch.distributed as dist

    ops = traced_step_ops(load_stage("05_train.py"), sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(sorted(ops)))
    dist.destroy_process_group()
