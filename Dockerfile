# tpserve for CUDA machines: one torchrun rank per visible GPU.
#   docker build -t tpserve:0.1.0-cuda .
#   docker run --gpus all --shm-size 16g -p 50051:50051 -p 8000:8000 -p 8081:8081 \
#       -v /models:/models:ro tpserve:0.1.0-cuda --model /models/target
# Arguments after the image name go to launch/serve.py; TPSERVE_NPROC sets the ranks per container
# (default: the GPUs nvidia-smi lists, else 1).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# The CUDA libraries torch needs come with its wheels; the image's part is the driver interface.
# gcc, libc6-dev and python3-dev are runtime needs: Triton compiles its kernel launchers with the
# system C compiler against Python.h the first time a kernel runs.
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root UID/GID (10001) so that Kubernetes' runAsUser / fsGroup can name it.
RUN groupadd --gid 10001 tpserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin tpserve \
    && install -d -o 10001 -g 10001 /app
WORKDIR /app
COPY --chown=10001:10001 . /app
USER 10001:10001

# The README's installer: /app/.venv with tpserve installed editable. A build sees no GPU, so the
# CUDA build of torch is asked for explicitly (TPSERVE_TORCH=cuda).
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
RUN TPSERVE_TORCH=cuda scripts/install.sh

# 50051 gRPC (TLS with --tls-cert/--tls-key), 8000 OpenAI HTTP API and /metrics, 8081 plaintext
# grpc.health.v1 for probes.
EXPOSE 50051 8000 8081
# sh -c runs torchrun with exec, so torchrun is PID 1 and gets SIGTERM (it forwards it to the
# ranks, which drain); "$@" are the arguments given to docker run, after (so overriding) the
# ports set here.
ENTRYPOINT ["/bin/sh", "-c", "n=\"${TPSERVE_NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}\"; [ \"${n:-0}\" -gt 0 ] || n=1; exec .venv/bin/torchrun --nproc-per-node \"$n\" launch/serve.py --host 0.0.0.0 --port 50051 --http-port 8000 --health-port 8081 \"$@\"", "tpserve"]
