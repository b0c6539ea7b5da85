# The service image: bash start_all.sh --foreground (one worker per visible GPU, then the gateway).
#   docker build -t omni-duplex .
#   docker run --gpus all -p 8006:8006 \
#     -v omni-compile-cache:/app/torch_compile_cache -v /path/to/MiniCPM-o-4_5:/models/minicpm-o-4_5:ro \
#     -v omni-data:/app/data omni-duplex
# Point model.model_path at /models/... in a config file (mount it and pass --config, or bake it in).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ffmpeg curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 omni \
    && mkdir -p /app /models \
    && chown omni:omni /app /models

WORKDIR /app
COPY --chown=omni:omni . /app
USER 10001

# .venv with torch (the PyPI build for CUDA) and the project; start_all.sh re-runs this as a no-op.
RUN bash scripts/setup_env.sh \
    && mkdir -p torch_compile_cache data run

VOLUME ["/app/torch_compile_cache", "/models", "/app/data"]
EXPOSE 8006

# Workers load, compile and warm up before the gateway listens: allow a long start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["bash", "-c", "curl -fsS http://127.0.0.1:8006/health || exit 1"]

ENTRYPOINT ["bash", "start_all.sh", "--foreground"]
