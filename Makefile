# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs mutask with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases this project is developed and tested with
# (the CI machines have them on local disk); pyproject.toml keeps honest ranges for users.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export BENTOML_DO_NOT_TRACK := true

.PHONY: venv demo test clean

$(BIN)/mutask: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $(BIN)/mutask

venv: $(BIN)/mutask

# the embedded suite on the ImageNet EfficientNet-Lite0 root, `demo` budget: <= 15 minutes on 2 CPU cores
# (`mutask demo --help`); progress bars print plain lines every ~30 s when the output is a file
demo: venv
	$(BIN)/mutask demo --budget demo

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
