# syntax=docker/dockerfile:1
# mlsignal: one image for mlsignal-training, mlsignal-inference and the mlsignal CLI.
#   docker build -t mlsignal .
# Configuration is only through MLSIGNAL_* environment variables (see shared/settings.py); the image holds no secrets.

# ---- builder: the mlsignal wheel with the server extras, and wheels of all their dependencies -------------------------------------------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlsignal ./mlsignal
COPY shared ./shared
COPY training_service ./training_service
COPY inference_service ./inference_service
RUN pip wheel --wheel-dir /wheels ".[training,dask]"
# The native forest kernel, built here with the record of its sha256 and source (shared/forest_runtime.py): the final
# image has no compiler, and inference loads this build only if the record vouches for it.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
 && pip install --no-index --find-links=/wheels numpy \
 && python -m shared.forest_runtime --build-prebuilt /kernel

# ---- final: the installed wheel, no compilers or build tools, a non-root user ------------------------------------
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLSIGNAL_MODEL_DIR=/var/lib/mlsignal/models \
    MLSIGNAL_TRAINING_ADDR=0.0.0.0:50051 \
    MLSIGNAL_INFERENCE_ADDR=0.0.0.0:50052 \
    MLSIGNAL_LOG_FORMAT=json
# The wheels are bind-mounted from the builder for this one step, so they never become a layer of the image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "mlsignal[training,dask]" \
 && groupadd --system --gid 10001 mlsignal \
 && useradd --system --uid 10001 --gid mlsignal --home-dir /var/lib/mlsignal --shell /usr/sbin/nologin mlsignal \
 && mkdir -p /var/lib/mlsignal/models \
 && chown -R mlsignal:mlsignal /var/lib/mlsignal
# The forest kernel built in the builder stage, owned by root and read-only to the service user.
COPY --from=builder /kernel/ /usr/local/lib/python3.11/site-packages/shared/
WORKDIR /var/lib/mlsignal
USER 10001:10001
# 50051 training, 50052 inference (gRPC); 9100 Prometheus metrics when MLSIGNAL_METRICS_PORT=9100.
EXPOSE 50051 50052 9100
CMD ["mlsignal", "--help"]
