# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastft-installed
# The pinned dev/CI stack: a CUDA 13 build that also runs on the CPU.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

# Debian packages ffcv 1.0.2 compiles against (extra `ffcv`): installed when missing, as root (CI runs as root).
# Without root and without them, fastft installs without the ffcv extra (its tests are skipped) and says so.
FFCV_APT := pkg-config libturbojpeg0-dev libopencv-dev

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	@extras=dev,dali,ffcv; dpkg -s $(FFCV_APT) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(FFCV_APT); \
	  else extras=dev,dali; echo "note: installing without the ffcv extra (FFCV loader, fastft-convert-dataset): it" \
	    "needs the Debian packages $(FFCV_APT): sudo apt-get install them, then make install again" >&2; fi; }; \
	  echo "$(PY) -m pip install --quiet -e '.[$$extras]'"; $(PY) -m pip install --quiet -e ".[$$extras]"
	touch $(STAMP)

install: $(STAMP)

# Pretrain MoCo v2 + FT on the built-in scenes on the CPU, then kNN and a linear probe: trained vs random init vs pixels.
# DEMO_DIR: the run folder (a new one for other overrides, e.g. make demo DEMO_DIR=runs/demo5 ARGS=optim.epochs=5).
DEMO_DIR ?= runs/demo
demo: install
	$(VENV)/bin/fastft-train demo run.out_dir=$(DEMO_DIR) $(ARGS)
	$(VENV)/bin/fastft-linear demo run.out_dir=$(DEMO_DIR) --compare-random-init linear.cache_features=true $(ARGS)
	$(VENV)/bin/fastft-viz $(DEMO_DIR) --out $(DEMO_DIR)/viz
	$(VENV)/bin/fastft-knn demo data.path=builtin:photodigits --pixels $(ARGS)
	$(VENV)/bin/fastft-knn demo data.path=builtin:photodigits --random-init $(ARGS)

# The demo's recipe as MoCo v2 / + pos extrapolation / + neg interpolation / + both, 3 seeds each, 4 epochs
# (the demo trains 10: 12 runs of 10 would take 80 min), kNN and linear probe, on the CPU (about 38 min on 2 free
# cores): its section of ABLATION.md, figures in runs/ablation/demo-scenes/viz/index.html. E.g. ARGS="--seeds 0",
# ARGS=data.path=builtin:photodigits (the photodigits section, runs in runs/ablation/demo-photodigits), or
# ABLATION_EPOCHS=200 ARGS="--config in100 --nproc-per-node 8" on an 8-GPU node.
ABLATION_EPOCHS ?= 4
.PHONY: ablation
ablation: install
	$(PY) -m fastft.ablation --epochs $(ABLATION_EPOCHS) $(ARGS)

# The import rules first (seconds), then the suite.
test: install
	$(PY) scripts/lint_imports.py
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info
