# room-allocator container image: a static-enough release build on Debian,
# run as a non-root user on distroless (no shell, no package manager).
# Build:
#   docker build -t room-allocator \
#     --build-arg VERSION=$(cargo pkgid | cut -d'#' -f2) \
#     --build-arg REVISION=$(git rev-parse HEAD) \
#     --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) .
#
# Base images by digest: a tag moves when it is rebuilt, a digest does not,
# so the defaults below are pinned (`tag@sha256:...`; with both, the digest
# decides what is pulled). The digests were not resolved from a registry
# here (this machine has none): they are the ones several public
# repositories pin for these same tags (rust:1.89-bookworm in 8+,
# cc-debian12:nonroot in 7+). They MUST be re-resolved at each release, and
# kept current between releases (Renovate or Dependabot update such pins),
# or the image keeps base layers without security fixes:
#   docker buildx imagetools inspect rust:1.89-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
#   (or: crane digest rust:1.89-bookworm)
# then update the ARG defaults, or override them for one build:
#   docker build \
#     --build-arg BUILD_IMAGE=rust:1.89-bookworm@sha256:<digest> \
#     --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:<digest> ...
# scripts/chart_test.py fails if a default here is not pinned by digest.
ARG BUILD_IMAGE=rust:1.89-bookworm@sha256:948f9b08a66e7fe01b03a98ef1c7568292e07ec2e4fe90d88c07bb14563c84ff
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions in Cargo.lock.
RUN cargo build --release --locked --bin room-allocator \
 && install -D -m 0755 target/release/room-allocator /out/room-allocator

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# OCI image annotations (https://github.com/opencontainers/image-spec/blob/main/annotations.md).
LABEL org.opencontainers.image.title="room-allocator" \
      org.opencontainers.image.description="Allocates SGLang/Dynamo bootstrap rooms aligned to prefill dp ranks, never twice." \
      org.opencontainers.image.source="https://github.com/room-allocator/room-allocator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
COPY --from=build /out/room-allocator /usr/local/bin/room-allocator
# The embedded store's default location; mount a volume here (the Helm chart
# does). Everything else in the image is read-only at run time.
WORKDIR /var/lib/room-allocator
USER 65532:65532
# gRPC (--listen), metrics (--metrics-listen) and the plaintext health
# listener (--health-listen, the kubelet's gRPC probes; on in the CMD below):
# the chart's service.grpcPort, metricsPort and healthPort defaults.
EXPOSE 50051 9090 50052
# Kubernetes probes call grpc.health.v1 natively, so no HEALTHCHECK here.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/room-allocator"]
CMD ["serve", "--data-dir", "/var/lib/room-allocator", "--health-listen", "0.0.0.0:50052"]
