# The two set-up commands: `make demo` and `make test` (both create .venv when it is missing).
VENV ?= .venv
BIN := $(VENV)/bin
# glibc's malloc unmaps large freed buffers and faults them in again on every step; keeping them
# mapped made training ~2x faster on the 2-core VMs (see README, "Performance").
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
export LCTRUN_DATA ?= $(abspath ../shared/data)

.PHONY: venv demo test test-fast lint format bench methods-tables tables-small clean

venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: venv
	$(BIN)/lctrun compare experiments/demo-fashion.yaml --methods bp,lct@distributed,dgl@distributed

test: venv
	$(BIN)/pytest -q --durations=15  # the slowest tests, in every run: the suite must stay well under 15 min

test-fast: venv
	$(BIN)/pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check lctrun tests scripts
	$(BIN)/ruff format --check lctrun tests scripts

format: venv
	$(BIN)/ruff format lctrun tests
	$(BIN)/ruff check --fix lctrun tests

# every bp baseline (1 worker, model-parallel, GPipe and 1F1B) beside the local methods: official critic, then pooled,
# then pooled again at bf16 autocast with channels-last tensors (compare it with the fp32 pooled table)
bench: venv
	$(BIN)/lctrun bench resnet20 --groups 2 --methods bp,lct,dgl,dni
	$(BIN)/lctrun bench resnet20 --groups 2 --methods bp,lct,dgl critic.pool=4
	$(BIN)/lctrun bench resnet20 --groups 2 --methods bp,lct,dgl critic.pool=4 precision=bf16 memory_format=channels_last

# every published table at small scale, 3 seeds where it is an accuracy table (CPU, see README for the time);
# resumable: finished runs are cached under results/tables/runs/
tables-small: venv
	$(BIN)/lctrun reproduce --all --scale small

# bp vs lct (2 and 3 groups) vs dgl vs dni on full MNIST and Fashion-MNIST (CPU, ~25 min)
METHODS_EPOCHS ?= 2
methods-tables: venv
	for d in mnist fashion-mnist; do \
	  $(BIN)/lctrun compare experiments/mnist-cnn.yaml --methods bp,lct,dgl,dni data.name=$$d model.split=[conv2] \
	    epochs=$(METHODS_EPOCHS) --out results/methods/$$d-k2 || exit 1; \
	  $(BIN)/lctrun compare experiments/mnist-cnn.yaml --methods bp,lct,dgl data.name=$$d model.split=[conv1,conv3] \
	    epochs=$(METHODS_EPOCHS) --out results/methods/$$d-k3 || exit 1; \
	done

clean:
	rm -rf results/runs results/compare .pytest_cache
