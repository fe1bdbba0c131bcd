# CPU image of clipft: `docker build -t clipft .` then
# `docker run -v hf-cache:/home/clipft/.cache/huggingface clipft encode --text "a photo of a cat"`.
# The CUDA variant and Kubernetes manifests are tracked separately (deployment issue).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin clipft

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 clipft
COPY --from=build /src/target/release/clipft /usr/local/bin/clipft
USER clipft
ENV HF_HOME=/home/clipft/.cache/huggingface
VOLUME ["/home/clipft/.cache/huggingface"]
ENTRYPOINT ["clipft"]
CMD ["--help"]
