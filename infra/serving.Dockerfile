# Inference server image: `tuneline serve` (KServe V2 REST on ONNX Runtime) over a model registry volume.
#
#   docker build -f infra/serving.Dockerfile -t tuneline-serve:latest .   (from the repository root)
#   docker run --rm --gpus all -p 8000:8000 -v tuneline_registry:/registry:ro tuneline-serve:latest
#
# It serves the registry's champion from /registry (TUNELINE_SERVE_REGISTRY), reloads on promotion, and is
# ready (/v2/health/ready) once that model is loaded and warm. Settings: params.yaml's serve section baked in
# below, overridden by TUNELINE_SERVE_<KEY> variables (DEVICE, MAX_BATCH_SIZE, ...; TOKEN for bearer auth).
#
# Base: CUDA 13 runtime + cuDNN 9, what onnxruntime-gpu's CUDA provider links and loads (libcudart.so.13,
# libcublas.so.13, libcudnn.so.9). No PyTorch here: infra/requirements.py --serving leaves the training stack out.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A venv: Ubuntu's Python refuses system-wide pip (PEP 668). uid 1000 (Ubuntu's `ubuntu` user gives it up) is
# the uid the Kubernetes manifests run as and that owns the registry volume.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && (userdel --remove ubuntu 2>/dev/null || true) && (groupdel ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 tuneline && useradd --uid 1000 --gid 1000 --create-home tuneline
ENV PATH=/opt/venv/bin:$PATH

# Dependencies in their own layer (cached across code edits), then the package itself without them: every
# folder pyproject.toml maps into `tuneline` (its package-dir), installed as a regular, non-editable package.
# tasks/ and flows/ come along because `tuneline` (flows/cli.py) is the entry point, but `tuneline serve`
# imports only tuneline.core and tuneline.serving (tests/serving/test_serving_venv.py builds this same install).
COPY pyproject.toml infra/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py --serving /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
 && pip install -r /tmp/build/requirements.txt
COPY README.md /tmp/build/
COPY tuneline /tmp/build/tuneline
COPY core /tmp/build/core
COPY flows /tmp/build/flows
COPY tasks /tmp/build/tasks
COPY serving /tmp/build/serving
RUN pip install --no-deps /tmp/build && rm -rf /tmp/build \
 && mkdir -p /registry && chown 1000:1000 /registry

# `tuneline serve` reads params.yaml from its working directory (--project defaults to ".").
WORKDIR /srv/tuneline
COPY params.yaml ./
# serve.host defaults to loopback, which nothing outside the container could reach.
ENV TUNELINE_SERVE_HOST=0.0.0.0 TUNELINE_SERVE_REGISTRY=/registry
USER 1000:1000
EXPOSE 8000

# Ready = the champion is loaded and warm (503 before: no model yet, or loading). The probe paths need no token.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TUNELINE_SERVE_PORT', '8000'), timeout=2)"]

ENTRYPOINT ["tuneline"]
CMD ["serve"]
