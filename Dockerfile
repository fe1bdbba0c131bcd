# clipft images, CPU and CUDA from one file:
#   docker build -t clipft:cpu .
#   docker build -t clipft:cuda --build-arg VARIANT=cuda --build-arg CUDA_COMPUTE_CAP=90 .
# The binary is the entrypoint (`docker run clipft:cpu executor --model openai/clip-vit-base-patch32`);
# `jina` is a link to it, so Jina's generated Kubernetes YAML (`jina executor ...`,
# `jina ping executor grpc://...`) runs unchanged. Models are cached on the volume at
# /home/clipft/.cache/huggingface. The build steps are scripts/build-release.sh, which CI also
# runs (tests/deploy.rs), so they cannot rot; the Dockerfile is linted with hadolint in CI.

ARG VARIANT=cpu

FROM rust:1.95-bookworm AS deps
WORKDIR /src
# The dependency layer: manifests, build script and protos only, so source edits reuse it.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY scripts/build-release.sh scripts/build-cuda.sh ./scripts/
RUN scripts/build-release.sh deps

FROM deps AS build-cpu
COPY src ./src
RUN scripts/build-release.sh cpu /clipft

FROM deps AS build-cuda
ARG CUDA_COMPUTE_CAP=90
# pip for the CUDA 13.0 toolchain wheels that scripts/build-cuda.sh installs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip=23.0.1+dfsg-1 \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_BREAK_SYSTEM_PACKAGES=1
COPY src ./src
RUN scripts/build-release.sh cuda /clipft "${CUDA_COMPUTE_CAP}"

FROM debian:bookworm-slim AS runtime-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311+deb12u1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /clipft /usr/local/bin/clipft

# The CUDA runtime image brings cudart, cuBLAS and cuRAND 13; the driver comes from the node.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS runtime-cuda
COPY --from=build-cuda /clipft /usr/local/bin/clipft

# The variant is chosen by build argument, so the base is a variable by design.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
RUN ln -s clipft /usr/local/bin/jina \
    && useradd --create-home --uid 10001 clipft \
    && mkdir -p /home/clipft/.cache/huggingface /data \
    && chown -R clipft /home/clipft /data
# Jina's Kubernetes export runs `jina executor --uses config.yml ...` in the working directory.
WORKDIR /home/clipft
COPY docker/config.yml /home/clipft/config.yml
USER 10001
ENV HF_HOME=/home/clipft/.cache/huggingface
VOLUME ["/home/clipft/.cache/huggingface"]
EXPOSE 8080 8081 9090 9091
ENTRYPOINT ["clipft"]
CMD ["--help"]
