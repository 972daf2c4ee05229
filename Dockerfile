# syntax=docker/dockerfile:1
# One image for the training job and the Serve app, on the Ray image of exactly the
# Ray and Python versions that pyproject.toml pins (tests/test_ops.py checks this).
#
#   docker build -t rayvit:0.1.0-gpu .                              # CUDA (default)
#   docker build -t rayvit:0.1.0-cpu --build-arg RAY_VARIANT=cpu .  # CPU only
#
#   docker run --rm --gpus all --shm-size=8g rayvit:0.1.0-gpu       # training job (CMD below)
#   docker run --rm --shm-size=4g -v "$PWD/data:/home/ray/app/data:ro" rayvit:0.1.0-cpu \
#       python ray_jobs/train.py --config configs/quick.yaml data.path=data/cifar10
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/models:/home/ray/app/models:ro" \
#       -e RAYVIT_SERVE_HOST=0.0.0.0 -e RAYVIT_API_KEYS=change-me rayvit:0.1.0-cpu \
#       python -m serve_app configs/serve.yaml                      # the Serve app
# The Serve app listens on the container's loopback (unreachable from the host) unless
# RAYVIT_SERVE_HOST says otherwise; a non-loopback host needs API keys (docs/serving.md).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_VARIANT=gpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}

ARG RAY_VERSION
ARG PYTHON_TAG
ARG RAY_VARIANT
ARG TORCH_VERSION=2.13.0
# CUDA build of torch for the GPU image, CPU build (no CUDA libraries) for the CPU image.
ARG TORCH_INDEX_GPU=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu

# The Ray images run as the non-root user "ray" (uid 1000, home /home/ray) and their
# Python environment belongs to it, so nothing below needs root.
USER ray
WORKDIR /home/ray/app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the index that matches the variant; `pip install .` then keeps it,
# since e.g. 2.13.0+cu128 satisfies the torch==2.13.0 pin.
RUN if [ "$RAY_VARIANT" = "cpu" ]; then index="$TORCH_INDEX_CPU"; else index="$TORCH_INDEX_GPU"; fi \
    && pip install "torch==${TORCH_VERSION}" --index-url "$index"

# Dependencies change less often than the code: install the package (and the DVC
# client for `dvc pull` on cluster nodes) before copying the rest of the project.
COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users rayvit/ rayvit/
RUN pip install ".[ops]" \
    && test "$(python -c 'import ray; print(ray.__version__)')" = "$RAY_VERSION" \
    && test "$(python -c 'import sys; print("py%d%d" % sys.version_info[:2])')" = "$PYTHON_TAG" \
    && python -c 'import ray, torch; print("ray", ray.__version__, "torch", torch.__version__)'

# The rest of the project (jobs, configs, serve app); .dockerignore keeps data,
# runs, models and virtualenvs out.
COPY --chown=ray:users . .

EXPOSE 8000
CMD ["python", "ray_jobs/train.py", "--config", "configs/train.yaml"]
