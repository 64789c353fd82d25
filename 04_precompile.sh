#!/usr/bin/env bash
# Stage 04: ahead-of-time compilation of the training graphs, so that 05 starts training at full speed.
#
# What it does on each device
#   Trainium (neuron_parallel_compile on PATH): runs the same torchrun ... 05_train.py command as training for
#     a few steps in graph-extraction mode, then compiles every extracted graph in parallel into the Neuron
#     compiler cache (xla.neuron.compiler_cache_url -> NEURON_COMPILE_CACHE_URL), and prints the graph totals.
#     The real 05 run with the same config then loads the compiled graphs instead of compiling them.
#   Other XLA devices (torch-xla installed, no Neuron compiler): runs the same few steps, which fills the
#     persistent XLA cache (xla.cache_dir) that the real run reuses.
#   CPU and CUDA without torch-xla: PyTorch runs eagerly; there are no graphs to compile ahead of time, so
#     this stage has nothing to do, says so and exits 0.
#
# Usage: bash 04_precompile.sh [--config FILE ...] [dotted.key=value ...]     (the same arguments as 05)
#   Trainium, one trn1.32xlarge:   bash 04_precompile.sh --config config.yaml
#   Trainium, several nodes: set on every node the same variables as for the training launch, e.g.
#                                  NNODES=4 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 bash 04_precompile.sh ...
#   CPU/CUDA:                      bash 04_precompile.sh --config config.yaml --config demo.yaml
# Environment: NPROC_PER_NODE (32), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (41000),
#   PRECOMPILE_STEPS (10, as NxDT's COMPILE=1 run), PYTHON (default .venv/bin/python if present).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
STEPS=${PRECOMPILE_STEPS:-10}
TORCHRUN=("$PY" -m torch.distributed.run --nproc_per_node "${NPROC_PER_NODE:-32}" --nnodes "${NNODES:-1}"
          --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-41000}")
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/precompile.XXXXXX")  # the extraction run's outputs are not a real run
trap 'rm -rf "$SCRATCH"' EXIT
# The training steps and the validation pass are what get compiled; generation (dynamic shapes) is skipped on XLA.
STEP_ARGS=("trainer.max_steps=${STEPS}" "exp_manager.create_tensorboard_logger=false"
           "exp_manager.explicit_log_dir=${SCRATCH}/run" "evaluation.generate.num_prompts=0")

if command -v neuron_parallel_compile >/dev/null 2>&1; then
  echo "04: Neuron compiler found: extracting graphs from ${STEPS} training steps, then compiling them in parallel"
  neuron_parallel_compile "${TORCHRUN[@]}" 05_train.py "$@" "${STEP_ARGS[@]}" "trainer.accelerator=xla" \
    2>&1 | tee "${SCRATCH}/compile.log"
  echo "04: graphs compiled into the Neuron cache (${NEURON_COMPILE_CACHE_URL:-as set by xla.neuron.compiler_cache_url}):"
  grep -E "Total (graphs|successful compilations|failed compilations)" "${SCRATCH}/compile.log" || {
    echo "04: neuron_parallel_compile printed no graph totals; see the log above" >&2; exit 1; }
  if grep -qE "Total failed compilations: [1-9]" "${SCRATCH}/compile.log"; then
    echo "04: some graphs failed to compile" >&2
    exit 1
  fi
  exit 0
fi

if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch_xla') is None)"; then
  echo "04: torch-xla found (no Neuron compiler): running ${STEPS} steps to fill the persistent XLA cache (xla.cache_dir)"
  "${TORCHRUN[@]}" 05_train.py "$@" "${STEP_ARGS[@]}" "trainer.accelerator=xla"
  echo "04: graphs compiled: $(tail -n 1 "${SCRATCH}/run/metrics.jsonl" | sed -E 's/.*"xla_compiles": ([0-9]+).*/\1/')"
  exit 0
fi

echo "04: no Trainium compiler and no torch-xla here: 05 runs eagerly on CPU/CUDA, so there is nothing to"
echo "    compile ahead of time. Nothing done."
