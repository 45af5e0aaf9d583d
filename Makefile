# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastft-installed
# The pinned dev/CI stack: a CUDA 13 build that also runs on the CPU.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Pretrain MoCo v2 + FT on the built-in digits on the CPU, then kNN: trained vs random init vs raw pixels.
demo: install
	$(PY) -m fastft.train configs/demo.yaml $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info
