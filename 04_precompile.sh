#!/usr/bin/env bash
# Stage 04: ahead-of-time compilation of the training graphs, so that 05 starts training at full speed.
#
# What precompilation means on each device
#   Trainium (neuron_parallel_compile on PATH): runs the training command for a few steps in graph-extraction
#     mode, then compiles every extracted graph in parallel into the persistent Neuron compiler cache
#     (NEURON_COMPILE_CACHE_URL); the real 05 run then loads the compiled graphs instead of compiling them.
#   CPU and CUDA without torch-xla: PyTorch runs eagerly; there are no graphs to compile ahead of time, so
#     this stage has nothing to do and says so.
#
# Usage: bash 04_precompile.sh [--config FILE ...] [dotted.key=value ...]     (the same arguments as 05)
#   Trainium:  bash 04_precompile.sh --config config.yaml
#   CPU/CUDA:  bash 04_precompile.sh --config config.yaml --config demo.yaml
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
STEPS=${PRECOMPILE_STEPS:-10}

if command -v neuron_parallel_compile >/dev/null 2>&1; then
  echo "04: Neuron compiler found: extracting graphs from ${STEPS} training steps, then compiling them in parallel"
  neuron_parallel_compile torchrun --nproc_per_node "${NPROC_PER_NODE:-32}" 05_train.py "$@" \
    "trainer.max_steps=${STEPS}" "exp_manager.create_tensorboard_logger=false"
  exit 0
fi

if "$PY" -c "import torch_xla" >/dev/null 2>&1; then
  echo "04: torch-xla found but no neuron_parallel_compile: this version of 05 trains on CPU or CUDA only, so"
  echo "    there is no XLA cache to warm; set trainer.accelerator=cpu or cuda."
  exit 0
fi

echo "04: no Trainium compiler and no torch-xla here: 05 runs eagerly on CPU/CUDA, so there is nothing to"
echo "    compile ahead of time. Nothing done."
