#!/usr/bin/env bash
# Stage 04: ahead-of-time compilation of the training graphs, so that 05 starts training at full speed.
#
# What it does on each device
#   Trainium trn1 (neuron_parallel_compile on PATH): runs the same torchrun ... 05_train.py command as training
#     for a few steps in graph-extraction mode, then compiles every extracted graph in parallel into the Neuron
#     compiler cache (xla.neuron.compiler_cache_url), and prints the graph totals. The real 05 run with the
#     same config then loads the compiled graphs instead of compiling them. It fails if no graph was extracted
#     or any graph failed to compile; with a warm cache (nothing left to compile) it says so and succeeds.
#   Other XLA devices (torch-xla installed, no Neuron compiler): runs the same few steps, which fills the
#     persistent XLA cache (xla.cache_dir) that the real run reuses; fails if nothing was compiled.
#   CPU and CUDA without torch-xla: PyTorch runs eagerly; there are no graphs to compile ahead of time, so
#     this stage has nothing to do, says so (with the command it would run on Trainium) and exits 0.
# On every device it first validates the config as 05 does (unknown keys, types, ranges, cross-key rules:
# `05_train.py --check-config`) and stops with 05's one-line error if it is wrong.
#
# The extraction run writes no run checkpoints (every rank would race over the same step_N.tmp while every
# graph returns zeros); 05 also skips them by itself when NEURON_EXTRACT_GRAPHS_ONLY is set.
#
# Usage: bash 04_precompile.sh [--config FILE ...] [dotted.key=value ...]     (the same arguments as 05)
#   Trainium, one trn1.32xlarge:   bash 04_precompile.sh --config config.yaml
#   Trainium, several nodes: set on every node the same variables as for the training launch, e.g.
#                                  NNODES=4 NODE_RANK=$SLURM_NODEID MASTER_ADDR=node0 bash 04_precompile.sh ...
#   CPU/CUDA:                      bash 04_precompile.sh --config config.yaml --config demo.yaml
# Environment: NPROC_PER_NODE (32), NNODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (41000),
#   PRECOMPILE_STEPS (10, as NxDT's COMPILE=1 run), PYTHON (default: the first of python3, python on PATH -
#   the active environment, e.g. the Neuron DLAMI's - and .venv/bin/python that has torch-xla).
set -euo pipefail

# Paths given on the command line (--config, overrides) are the caller's, as for the Python stages: 04 stays in the
# caller's directory and finds 05 (and the project's .venv) next to itself.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STAGE05="$HERE/05_train.py"

for arg in "$@"; do
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then  # the header above, without its comment marks
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed -E 's/^# ?//'
    exit 0
  fi
done
if [ ! -f "$STAGE05" ]; then
  echo "error: 04 runs 05_train.py, which is not next to it ($HERE); copy the two stages together" >&2
  exit 1
fi

has_module() { "$1" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$2') is None)" 2>/dev/null; }

# The interpreter that can run 05 on XLA: the active environment first (on Trainium, the Neuron virtual
# environment), then the project's .venv, whose CPU build of torch has no torch-xla.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  PY=""
  for cand in "$(command -v python3 || true)" "$(command -v python || true)" "$HERE/.venv/bin/python"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && has_module "$cand" torch_xla; then PY=$cand; break; fi
  done
  if [ -z "$PY" ]; then
    PY=$( [ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3 )
  fi
fi
STEPS=${PRECOMPILE_STEPS:-10}
TORCHRUN=("$PY" -m torch.distributed.run --nproc_per_node "${NPROC_PER_NODE:-32}" --nnodes "${NNODES:-1}"
          --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-41000}")
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/precompile.XXXXXX")  # the extraction run's outputs are not a real run
trap 'rm -rf "$SCRATCH"' EXIT
# The training steps and the validation pass are what get compiled; generation (dynamic shapes) is skipped on XLA.
STEP_ARGS=("trainer.max_steps=${STEPS}" "exp_manager.create_tensorboard_logger=false"
           "exp_manager.explicit_log_dir=${SCRATCH}/run" "evaluation.generate.num_prompts=0"
           "exp_manager.checkpoint_callback_params.every_n_train_steps=0" "trainer.accelerator=xla")

# The config, validated as 05 validates it (05 prints the one-line error), before anything is launched.
"$PY" "$STAGE05" "$@" --check-config || exit 1

# The config's Neuron variables, exported here: neuron_parallel_compile compiles into NEURON_COMPILE_CACHE_URL
# itself, so the workers alone having it is not enough; MALLOC_ARENA_MAX takes effect only from a process's start.
export_neuron_environment() {
  local lines
  lines=$("$PY" "$STAGE05" "$@" --neuron-env)
  eval "$lines"
  echo "04: Neuron compiler cache: ${NEURON_COMPILE_CACHE_URL}; NEURON_CC_FLAGS: ${NEURON_CC_FLAGS}"
}

if command -v neuron_parallel_compile >/dev/null 2>&1; then
  if ! has_module "$PY" torch_xla; then
    echo "04: neuron_parallel_compile is here but $PY has no torch-xla; activate the Neuron virtual environment" \
         "(requirements-neuron.txt) or set PYTHON to its interpreter" >&2
    exit 1
  fi
  export_neuron_environment "$@"
  echo "04: Neuron compiler found: extracting graphs from ${STEPS} training steps with $PY, then compiling them in parallel"
  neuron_parallel_compile "${TORCHRUN[@]}" "$STAGE05" "$@" "${STEP_ARGS[@]}" 2>&1 | tee "${SCRATCH}/compile.log"
  # A warm cache: every extracted graph is compiled already, and the tool returns before its totals.
  if grep -q "No todo hlos found" "${SCRATCH}/compile.log" && ! grep -q "Total graphs" "${SCRATCH}/compile.log"; then
    echo "04: every graph of these steps is in the Neuron cache (${NEURON_COMPILE_CACHE_URL}) already:" \
         "nothing needed compiling"
    exit 0
  fi
  echo "04: graphs compiled into the Neuron cache (${NEURON_COMPILE_CACHE_URL}):"
  grep -E "Total (graphs|successful compilations|failed compilations)" "${SCRATCH}/compile.log" || {
    echo "04: neuron_parallel_compile printed no graph totals; see the log above" >&2; exit 1; }
  total=$(grep -oE "Total graphs: [0-9]+" "${SCRATCH}/compile.log" | tail -n 1 | grep -oE "[0-9]+$")
  if [ "${total:-0}" -eq 0 ]; then
    echo "04: no graph was extracted, so nothing was compiled; see the training output above" >&2
    exit 1
  fi
  if grep -qE "Total failed compilations: [1-9]" "${SCRATCH}/compile.log"; then
    echo "04: some graphs failed to compile" >&2
    exit 1
  fi
  exit 0
fi

if has_module "$PY" torch_xla; then
  export_neuron_environment "$@"
  echo "04: torch-xla found (no Neuron compiler): running ${STEPS} steps with $PY to fill the persistent XLA cache (xla.cache_dir)"
  "${TORCHRUN[@]}" "$STAGE05" "$@" "${STEP_ARGS[@]}"
  compiled=$(grep -oE '"xla_compiles": [0-9]+' "${SCRATCH}/run/metrics.jsonl" | tail -n 1 | grep -oE "[0-9]+$" || true)
  echo "04: graphs compiled: ${compiled}"
  if [ "${compiled:-0}" -eq 0 ]; then
    echo "04: no graph was compiled; see the training output above" >&2
    exit 1
  fi
  exit 0
fi

echo "04: no Trainium compiler and no torch-xla here: 05 runs eagerly on CPU/CUDA, so there is nothing to"
echo "    compile ahead of time. Nothing done. On a trn1 host with the Neuron SDK this stage would run:"
echo "    neuron_parallel_compile ${TORCHRUN[*]} $STAGE05 $* ${STEP_ARGS[*]}"
