# genq worker / CLI image.
#
#   CPU (default):  docker build -t genq:cpu .
#   GPU:            docker build -t genq:gpu --build-arg TORCH_INDEX=https://pypi.org/simple .
#
# PyPI's Linux torch wheel is the CUDA build; https://download.pytorch.org/whl/cuXYZ pins one CUDA version.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Extra PyPI requirements for one image only, e.g. "flower~=2.0" for the monitoring service. Space-separated, and
# without shell metacharacters (write ~= or ==, never >=: the shell would read ">" as a redirection).
ARG EXTRA_PACKAGES=""

# MALLOC_ARENA_MAX: glibc gives each busy thread its own malloc arena and keeps what it freed. `genq worker` caps
# its arenas itself (GENQ_MALLOC_ARENA_MAX, worker/memory.py); this covers every other process.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2

# torch first and alone: it is by far the largest layer and changes least often, so code edits reuse it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY producer ./producer
COPY worker ./worker
# The torch above already satisfies the project's range, so this pulls only the light dependencies.
# EXTRA_PACKAGES is unquoted on purpose, so that it splits into separate requirements.
RUN pip install ".[worker]" ${EXTRA_PACKAGES}

RUN useradd --create-home --uid 10001 genq
USER genq
# A writable working directory: local storage (GENQ_STORAGE=local) writes ./genq-data.
WORKDIR /home/genq

ENTRYPOINT ["genq"]
CMD ["--help"]
