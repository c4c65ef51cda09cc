// Package e2e holds shm-cni's privileged end-to-end tests: each test builds
// a node in a box (package node: a fresh host network namespace running the
// real shm-agent, the real shm-cni binary run through libcni, pods in their
// own namespaces, sandbox workload processes, an outside namespace) and
// checks it with real, verified TCP traffic and with the agent's own
// accounting (/proc, /metrics, state).
//
// Run as root:
//
//	go test -race -count=1 ./test/e2e/...
//
// Without root every test skips. Under -race the agent and the sandbox
// program are race-built too (but for the bulk transfers), so a data race
// in the agent under real traffic fails the test; SHM_E2E_RACE=0 or 1
// forces the choice.
package e2e
