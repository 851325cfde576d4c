# dcml — `make demo` runs the pipeline on the embedded demo dataset, `make test` the tests.
# Both create the virtual environment and install what they need on first use.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(abspath $(VENV))/bin
PY      := $(BIN)/python
STAMP   := $(VENV)/.installed-stamp

export PATH := $(BIN):$(PATH)
# Telemetry off; the ephemeral Prefect API may take a while to start on a small machine.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
# Prefect's database and profile live in the project, not in ~/.prefect.
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: help install install-gpu data demo test test-slow test-all lint bench bench-loader bench-retrieval bench-gpu bench-ddp bench-scaleout bench-scale prefect-server worker run-worker deploy mlflow-ui up down stack-env clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

# faiss: the CPU wheel, or the GPU one once `make install-gpu` chose it (the marker file keeps
# every later reinstall, e.g. after a pyproject.toml change, on the GPU wheel)
GPU_MARKER := $(VENV)/.faiss-gpu
FAISS = $(if $(wildcard $(GPU_MARKER)),gpu,cpu)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if [ "$(FAISS)" = gpu ]; then $(PY) -m pip uninstall --quiet -y faiss-cpu 2>/dev/null || true; fi
	$(PY) -m pip install --quiet -e '.[$(FAISS),dev,pretrained,stack]'
	$(PY) -m compileall -q -j 0 dcml tasks flows tests >/dev/null
	touch $@

install: $(STAMP)  ## create .venv and install dcml with its dependencies (faiss-cpu)

install-gpu:  ## the same with faiss-gpu instead of faiss-cpu (CUDA 12 wheel; docs/gpu.md); later make targets keep it
	$(PYTHON) -m venv $(VENV)
	touch $(GPU_MARKER)
	rm -f $(STAMP)
	$(MAKE) install
	$(PY) -c "from dcml.faiss_backend import build_summary; print(build_summary())"

data: $(STAMP)  ## generate the demo dataset (params.yaml data.demo; deterministic, offline) into the DVC cache
	$(BIN)/dcml data demo
	@# fills the cache; fails (instead of rewriting data.dvc) if the bytes differ from the versioned ones
	$(BIN)/dvc commit --quiet data.dvc </dev/null

demo: data  ## the main job: `dvc repro` = K sweep (K=1 baseline and K>1) on the demo dataset
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show
	@echo "comparison: outputs/comparison.md; plots: outputs/plots/*.png; MLflow: make mlflow-ui"

# Tests start their own Prefect API: a PREFECT_API_URL from the shell must not leak in.
test: $(STAMP)  ## the test suite (CPU, a few minutes; slow end-to-end tests excluded)
	env -u PREFECT_API_URL $(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)  ## the slow tests with real services: prefect server + workers, the PostgreSQL stack, torchrun
	env -u PREFECT_API_URL $(PY) -m pytest -m slow -q

test-all: $(STAMP)  ## every test
	env -u PREFECT_API_URL $(PY) -m pytest -q

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check dcml tasks flows tests bench scripts
	$(BIN)/ruff format --check dcml tasks flows tests bench scripts

bench: $(STAMP)  ## training throughput: our loop (resumed trainer) vs a bare torch loop
	$(PY) bench/bench_train_step.py --repeats 3

bench-loader: $(STAMP)  ## our loader + step over JPEG files vs a bare loop on in-memory tensors (CPU sizes)
	$(PY) bench/bench_loader.py --backbone small_cnn --image-size 64 --num-workers auto --repeats 3

bench-gpu: $(STAMP)  ## GPU benchmark (ResNet-50 step, host syncs, loader, JPEG decode, faiss; DDP 1 vs all GPUs): JSON
	$(PY) bench/bench_gpu.py
	$(PY) bench/bench_ddp.py --bf16 --channels-last --cudnn-benchmark
	$(PY) bench/bench_embed.py --backbone resnet50 --device cuda

bench-ddp: $(STAMP)  ## data-parallel throughput of our loop: 1 vs N processes under torchrun (CPU: 1 vs 2)
	$(PY) bench/bench_ddp.py

bench-scaleout: $(STAMP)  ## wall times on the demo: train on 1 vs 2 processes; sweep in one process vs 2 workers (stack)
	$(PY) bench/bench_scaleout.py

bench-scale: $(STAMP)  ## scale rehearsal on CPU: SOP-sized synthetic data through `dcml train` (JSON per phase)
	$(PY) bench/bench_scale.py

bench-retrieval: $(STAMP)  ## dcml embed / index eval + search / serve vs bare torch and faiss (JSON each; ~20 min on 2 cores)
	$(PY) bench/bench_embed.py
	$(PY) bench/bench_index.py
	$(PY) bench/bench_serve.py

prefect-server: $(STAMP)  ## Prefect server + UI on http://127.0.0.1:4200
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

worker: $(STAMP)  ## a process worker for the scheduled sweeps: the pool's default queue (needs PREFECT_API_URL)
	$(BIN)/prefect worker start --pool dcml-process --work-queue default

run-worker: $(STAMP)  ## a worker for `--workers` runs, one at a time (queue `runs`; set CUDA_VISIBLE_DEVICES per GPU)
	$(BIN)/prefect worker start --pool dcml-process --work-queue runs --limit 1

deploy: $(STAMP)  ## register the nightly K sweep (needs PREFECT_API_URL)
	$(BIN)/dcml deploy --cron "0 2 * * *" --timezone UTC

mlflow-ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:5000 over ./mlflow.db
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The shared stack in .stack/ (ports: DCML_STACK_PG_PORT, DCML_STACK_PREFECT_PORT, DCML_STACK_MLFLOW_PORT);
# clients: eval "$$(make -s stack-env)".
up: $(STAMP)  ## the shared stack: PostgreSQL + Prefect server + MLflow server on 127.0.0.1, see scripts/stack.py
	$(PY) scripts/stack.py up

down: $(STAMP)  ## stop the shared stack (deletes its PostgreSQL data, keeps .stack/logs and artifacts)
	$(PY) scripts/stack.py down

stack-env: $(STAMP)  ## print the shared stack's export lines (PREFECT_API_URL, MLFLOW_TRACKING_URI, ...)
	@$(PY) scripts/stack.py env

clean:  ## remove outputs and tracking data (keeps .venv and data/)
	rm -rf outputs mlflow.db mlartifacts
