# The two commands of the README: `make demo` (main job) and `make test` (test suite).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo best test test-all lock pipeline bench clean

setup:  ## create .venv from requirements/lock.txt, install hivlp, bring Flickr8k into data/
	bash scripts/setup.sh

demo: setup  ## the main job: validate -> pretrain -> finetune -> evaluate -> report (restored from / pushed to the DVC remote)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/main_job.sh

best: setup  ## the best recipe (configs/best-*.yaml, EfficientNet-Lite2): pretrain -> finetune -> evaluate into outputs/best
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/best_recipe.sh

test: setup  ## the test suite (CI runs this)
	$(BIN)/python -m pytest -q

test-all: setup  ## including tests marked slow
	$(BIN)/python -m pytest -q -m "slow or not slow"

lock:  ## re-freeze requirements/lock.txt from the current .venv
	{ echo "# Exact versions of everything in .venv (pip freeze --all); regenerate with: make lock"; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -vE '^(-e|pip==|hivlp)'; } > requirements/lock.txt

pipeline: setup  ## recompile pipelines/hivlp.yaml and pipelines/hivlp-from-uri.yaml from pipelines/hivlp_pipeline.py
	$(BIN)/python -m pipelines.hivlp_pipeline

bench: setup  ## retrieval benchmark up to 1M candidates (writes bench/results/)
	$(BIN)/hivlp bench retrieval --out bench/results/retrieval.json

clean:
	rm -rf outputs .pytest_cache
