// Package kind holds tier 5 of the end-to-end tests: shm-cni in a kind
// cluster of three nodes (cluster.yaml, run.sh), with a Docker engine of its
// own (engine.sh), a node image built on the machine without a registry
// (hack/kind-node-image.sh, with mkimages for the images it preloads and
// ocicaps, the runtime that lets privileged nodes start where the machine
// withholds capabilities), and Kubernetes' own network conformance tests
// (conformance.sh). The tier needs root and is not part of make test; the
// package's Go tests check, by strict decoding into the real Kubernetes and
// kind API types, that the manifests in deploy/ and the cluster config are
// valid and agree with the agent's flags, health endpoints and the CNI
// plugin's config parser, and that the scripts parse.
package kind
