# The image a Docker or Kubernetes work pool runs dcml's flow runs in (one container per run).
# Not built or run in dcml's CI (no container runtime there): see README "Scaling out".
#
#   docker build -f deploy/worker.Dockerfile -t registry.example.org/dcml-worker:$(git rev-parse --short HEAD) .
#
# The worker process itself (`prefect worker start --pool dcml-k8s --type kubernetes`) runs
# elsewhere (e.g. Prefect's Helm chart) and only needs `prefect` and `prefect-kubernetes`; this
# image holds what a flow run needs: dcml, torch with CUDA, faiss-gpu, the psycopg driver.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1

# git: DVC and the run provenance (commit) read it; libgomp1: faiss' OpenMP
RUN apt-get update \
    && apt-get install -y --no-install-recommends git libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/dcml
# the dependencies first (cached layer), then the code
COPY pyproject.toml README.md ./
COPY dcml/ dcml/
COPY tasks/ tasks/
COPY flows/ flows/
COPY scripts/ scripts/
COPY params.yaml dvc.yaml ./
# torch's default Linux wheel brings its CUDA runtime; [gpu] = faiss-gpu (CUDA 12) + nvidia-ml-py
RUN pip install -e '.[gpu,stack]' \
    && python -m compileall -q dcml tasks flows

# Flow runs write run folders to the shared volume mounted here (the deployment's out_dir)
VOLUME ["/shared"]
# Prefect's worker sets the command (`prefect flow-run execute`); PREFECT_API_URL and the
# MLflow URL come from the work pool's job template (deploy/k8s-base-job-template.json).
