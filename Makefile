# Set-up and checks. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
LINT_PATHS := $(wildcard src tests benchmarks scripts integrations)
# The fast loop leaves out what takes minutes: slow tests, multi-process tests, browser tests.
FAST_MARKERS := not slow and not multiprocess and not browser
# Each test runs one intra-op thread (tests/conftest.py), so the tests run in one pytest-xdist worker per
# core, at most 4 (each holds its own torch). On 2 cores (measured): make test-fast 99-122 s instead of 224 s,
# the whole suite 16 min instead of 22. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 4 ] && n=4; echo $$n)

.PHONY: venv demo test test-fast lint format clean browser ui-screenshot comfyui-venv test-comfyui

DEMO_PROMPT ?= a large red circle on the left and a small yellow triangle on the right , on a gray background

venv: $(STAMP)

# Re-installs only when the package metadata or the pins change; quick when already done.
# The triton extra is installed so that the GPU kernels are checked under triton's CPU interpreter.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[dev,triton]" -c constraints.txt
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# What LinFusion is for, offline, on the bundled model: its 32 px native image (outputs/demo-stages/)
# enlarged 16x to 512x512 through the SDEdit chain (outputs/demo-512.png), each stage's size and time
# printed; about 22 s on 2 CPU cores (measured: README). The linear VAE attention makes the 512 px stage
# 3.4x faster than the exact one (measured); one intra-op thread is 1.7x faster than two when other jobs
# share the 2 cores.
demo: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/linfusion generate "$(DEMO_PROMPT)" --steps 10 --guidance 4 --seed 1 \
		--device cpu --mode sdedit --size 512x512 --vae-attention linear --save-stages outputs/demo-stages \
		--out outputs/demo-512.png

# The browser tests (pytest marker "browser") drive linfusion ui in Debian's Chromium: installed here when
# missing and run as root, else a clear message. make test always runs them; make test-fast leaves them out.
browser:
	@if [ -n "$$LINFUSION_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	else \
		echo "The browser tests need Chromium: run 'sudo apt-get install -y chromium' (or set LINFUSION_CHROMIUM"; \
		echo "to a Chromium binary), then make test again."; \
		exit 1; \
	fi

# Everything, the Triton kernels and the browser tests included (the kernels interpreted on the CPU; neither
# may be skipped here).
test: lint browser comfyui-venv
	HF_HUB_OFFLINE=1 LINFUSION_REQUIRE_TRITON=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-comfyui

# The edit-test loop: under 3 minutes on 2 cores.
test-fast: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

# Refresh the picture of the page in the README and docs/ui.md (docs/ui.png) from the browser test that takes it.
ui-screenshot: venv browser
	LINFUSION_UI_SCREENSHOT=docs/ui.png HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/ui/test_browser.py -k readme_screenshot

# The ComfyUI node pack (integrations/comfyui) is tested against the real ComfyUI in its own venv: ComfyUI
# needs older transformers / huggingface_hub / diffusers than the main venv. comfyui==0.0.1 is a yanked
# packaging of ComfyUI (pip installs it only by exact pin), installed without its dependencies, then the
# ones its server imports. The index's torchvision is a CUDA build: a .pth hook defines the two operators
# it needs to import next to the CPU torch (integrations/comfyui/tests/torchvision_cpu_ops.py).
# About 80 s and 1.8 GB once; the tests then take about 2 minutes on 2 cores.
COMFYUI_VENV ?= .venv-comfyui
COMFYUI_BIN := $(COMFYUI_VENV)/bin
COMFYUI_STAMP := $(COMFYUI_VENV)/.installed
COMFYUI_PACK := integrations/comfyui

comfyui-venv: $(COMFYUI_STAMP)

$(COMFYUI_STAMP): $(COMFYUI_PACK)/requirements-test.txt $(COMFYUI_PACK)/tests/torchvision_cpu_ops.py pyproject.toml constraints.txt
	test -x $(COMFYUI_BIN)/python || $(PYTHON) -m venv $(COMFYUI_VENV)
	$(COMFYUI_BIN)/python -m pip install -q --upgrade pip
	$(COMFYUI_BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(COMFYUI_BIN)/python -m pip install -q --no-deps comfyui==0.0.1
	$(COMFYUI_BIN)/python -m pip install -q -r $(COMFYUI_PACK)/requirements-test.txt -c constraints.txt
	$(COMFYUI_BIN)/python -m pip install -q --no-deps -e .
	site=$$($(COMFYUI_BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		cp $(COMFYUI_PACK)/tests/torchvision_cpu_ops.py "$$site/" && \
		echo "import torchvision_cpu_ops; torchvision_cpu_ops.install()" > "$$site/torchvision_cpu_ops.pth"
	touch $(COMFYUI_STAMP)

# In-process tests (LinFusionApply against diffusers + LinFusion, the VAE nodes against the untiled VAE) and
# the server tests (every example workflow posted to ComfyUI on 127.0.0.1).
test-comfyui: comfyui-venv
	cd $(COMFYUI_PACK) && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(CURDIR)/$(COMFYUI_BIN)/python -m pytest -q $(COMFYUI_PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(COMFYUI_VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
