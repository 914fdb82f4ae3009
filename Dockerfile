# The training and serving image of ray-llm-orchestrator: CUDA, torch, DeepSpeed, Ray and the project in /app.
# Used by every pod of k8s/ and by the cluster launcher's docker setting in cluster/aws.yaml and gcp.yaml.
#   docker build -t ray-llm-orchestrator:0.1.0 .
#   CPU image (k8s/overlays/dev): docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ray-llm-orchestrator:dev .
# `orchestrator k8s validate` checks that RAY_VERSION is the Ray pyproject.toml allows and the project runs,
# and that every manifest's rayVersion equals it.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# build-essential + python3-dev: DeepSpeed compiles its ops (e.g. CPU Adam for optimizer offload) at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ninja-build \
        git curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# Dependencies first, so that a code change does not reinstall them: an empty package stands in for the code.
COPY pyproject.toml README.md /app/
RUN mkdir -p /app/orchestrator && touch /app/orchestrator/__init__.py \
 && pip install --upgrade pip \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install "ray[default,train,tune,serve]==${RAY_VERSION}" -e /app

# Ray's pods (KubeRay: runAsUser 1000) and the launcher's containers run as this user, never as root.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --uid 1000 --create-home --shell /bin/bash ray
COPY --chown=1000:1000 . /app
WORKDIR /app
USER 1000
