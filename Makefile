# Quick start: `make demo` (set up, build, run the main job) and `make test` (set up, build, test).
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
VENV := .venv
VPY := $(VENV)/bin/python
BUILD := build
JOBS ?= $(or $(MAX_JOBS),$(shell nproc))
export CUDA_HOME ?= /usr/local/cuda

.PHONY: setup build test test-cpp test-py demo bench clean

setup: $(VENV)/.ready

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==$(TORCH_VERSION) "cmake>=3.26" ninja pytest numpy matplotlib tqdm transformers
	# make the source tree importable from anywhere in the venv (the build puts _C.so in it)
	echo "$(CURDIR)" > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ring_attention_dev.pth"
	touch $@

$(BUILD)/build.ninja: $(VENV)/.ready
	$(VENV)/bin/cmake -S . -B $(BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DPython3_EXECUTABLE=$(abspath $(VPY))

build: $(BUILD)/build.ninja
	$(VENV)/bin/cmake --build $(BUILD) -j $(JOBS)

test-cpp: build
	cd $(BUILD) && $(abspath $(VENV))/bin/ctest --output-on-failure

test-py: build
	$(VPY) -m pytest -q tests

test: test-cpp test-py

demo: build
	$(VPY) examples/demo.py

bench: build
	$(VPY) benchmarks/ring/bench_efficiency.py

clean:
	rm -rf $(BUILD) ring_attention/_C.so
