# The allocator's image.
#
#   docker build -f deploy/images/controller.Dockerfile -t vgpu-dra/controller:v0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p controller && cp target/release/controller /controller

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /controller /controller
ENTRYPOINT ["/controller"]
