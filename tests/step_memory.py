"""One fp32 CPU training step of 05 in a fresh process, for tests/test_dry_run.py: prints the resident memory
before the model is built and the process's peak after the step, in bytes, as JSON.

    python tests/step_memory.py --config config.yaml --config OVERLAY [dotted.key=value ...]

glibc is told (by the test, MALLOC_MMAP_THRESHOLD_) to map every block of 64 KiB or more on its own, so a freed
tensor leaves the resident set at once and the peak is the step's live tensors over the baseline."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import load_stage  # noqa: E402


def resident(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def main():
    train = load_stage("05_train.py")
    args = train.parse_args(sys.argv[1:])
    c = train.resolve(train.load_config(args.config, args.overrides), train.SCHEMA)
    arch = train.read_model_config(c["model.model_config"])
    device = torch.device("cpu")
    tokenizer = train.load_tokenizer(c)
    windows = train.load_split(c["data.train_dir"], tokenizer, c, "train", None)
    rows = sorted(range(len(windows)), key=lambda w: -int(windows.supervised[w]))[: c["data.micro_batch_size"]]
    mb = windows.batch(rows)
    torch.manual_seed(0)
    baseline = resident("VmRSS")
    model, modules, params = train.build_model(c, arch, device, train.Parallel(train.layout_of(c, arch), device))
    optimizer = train.make_optimizer(modules, c, device)
    train.loss_sum(model, mb, device, autocast=False).backward()
    optimizer.step()
    print(
        json.dumps(
            {"baseline": baseline, "peak": resident("VmHWM"), "supervised_per_row": int(windows.supervised[rows[0]])}
        )
    )


if __name__ == "__main__":
    main()
