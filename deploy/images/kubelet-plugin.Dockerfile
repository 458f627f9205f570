# The node agent's image: the kubelet-plugin binary and the enforcement library it installs on
# the host (its init container copies /opt/vgpu/libvgpu.so to the path the CDI specs mount; the
# Helm chart passes --from=/opt/vgpu/libvgpu.so).
#
#   docker build -f deploy/images/kubelet-plugin.Dockerfile -t vgpu-dra/kubelet-plugin:v0.1.0 .

# libvgpu.so is preloaded into arbitrary CUDA containers: build it against an old glibc
# (Debian 11, glibc 2.31) so that it loads in every image with that glibc or newer.
FROM rust:1-bullseye AS library
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p libvgpu && cp target/release/libvgpu.so /libvgpu.so

FROM rust:1-bookworm AS plugin
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kubelet-plugin \
 && cp target/release/kubelet-plugin /kubelet-plugin && cp target/release/install-library /install-library

FROM gcr.io/distroless/cc-debian12
COPY --from=plugin /kubelet-plugin /kubelet-plugin
COPY --from=plugin /install-library /install-library
COPY --from=library /libvgpu.so /opt/vgpu/libvgpu.so
ENTRYPOINT ["/kubelet-plugin"]
