# cloudbrain's image: the one binary, every role a command of it (`http`, `create-worker`,
# `refresh-worker`, `migrate`, the token and provider commands). Build it from the
# repository's root:
#   docker build -t cloudbrain .
# The Kubernetes manifests in deploy/kubernetes run it; docs/deploy.md says how.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cloudbrain \
    && install -m 0755 target/release/cloudbrain /cloudbrain

FROM debian:bookworm-slim
# Webhook deliveries verify TLS against the system's roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cloudbrain
COPY --from=build /cloudbrain /usr/local/bin/cloudbrain
USER 10001
ENV CLOUDBRAIN_ADDR=0.0.0.0:42191
EXPOSE 42191
ENTRYPOINT ["/usr/local/bin/cloudbrain"]
CMD ["http"]
