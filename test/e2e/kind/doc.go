// Package kind holds tier 5 of the end-to-end tests: shm-cni in a kind
// cluster (cluster.yaml, run.sh). They need docker and cannot run on the
// project's machines, so the package's Go tests check, by strict decoding
// into the real Kubernetes and kind API types, that the manifests in
// deploy/ and the cluster config are valid and agree with the agent's
// flags, health endpoints and the CNI plugin's config parser.
package kind
