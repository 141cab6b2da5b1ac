# room-allocator container image: a static-enough release build on Debian,
# run as a non-root user on distroless (no shell, no package manager).
# Build: docker build -t room-allocator .
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions in Cargo.lock.
RUN cargo build --release --locked --bin room-allocator \
 && install -D -m 0755 target/release/room-allocator /out/room-allocator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/room-allocator /usr/local/bin/room-allocator
# The embedded store's default location; mount a volume here (the Helm chart
# does). Everything else in the image is read-only at run time.
WORKDIR /var/lib/room-allocator
USER 65532:65532
EXPOSE 50051 9090
# Kubernetes probes call grpc.health.v1 natively, so no HEALTHCHECK here.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/room-allocator"]
CMD ["serve", "--data-dir", "/var/lib/room-allocator"]
