# syntax=docker/dockerfile:1
#
# One image with the node agent, its entrypoint, and the CNI plugins the
# agent installs on its node: shm-cni, and the reference portmap plugin
# (hostPort) that deploy/'s conflist chains after it, at the version go.mod
# pins (its tool directive). Static (CGO_ENABLED=0) binaries on an empty
# base: the agent runs no shell and reads no file of the image besides them.
#
# Without a Docker engine, `make image` builds the same image (the same
# files, modes, entrypoint, labels and build flags) with hack/image; its
# tests parse this file so that the two cannot drift apart.
ARG GO_VERSION=1.26
FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ENV CGO_ENABLED=0
RUN go build -trimpath -buildvcs=false -ldflags=-s -o /out/ ./cmd/shm-agent ./cmd/shm-cni github.com/containernetworking/plugins/plugins/meta/portmap

FROM scratch
COPY --from=build --chmod=0755 /out/shm-agent /out/shm-cni /out/portmap /usr/local/bin/
LABEL org.opencontainers.image.title="shm-cni" \
      org.opencontainers.image.description="shm-cni node agent and CNI plugin" \
      org.opencontainers.image.source="https://github.com/shm-cni/shm-cni"
ENTRYPOINT ["/usr/local/bin/shm-agent"]
