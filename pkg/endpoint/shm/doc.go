// Package shm is the shared-memory link between a sandbox and the node agent:
// gVisor link endpoints on a queue pair (pkg/queue) and the dial protocol by
// which a sandbox gets its pair.
//
// The agent's side is a Server (NewServer): it checks everything the sandbox
// writes into shared memory and cuts a sandbox that breaks the protocol off
// (Stats().Violations); a full queue drops and counts. The sandbox's side is
// a Client (NewClient), for the sandbox's own netstack. Both are a
// queueEndpoint (shm.go): framing, receive loop, transmit and lifecycle.
//
// A sandbox calls Dial with the socketPath of its CNI result and gets a ready
// Client and the LinkConfig to apply to its netstack (LinkConfig.Configure);
// DialPair is for a sandbox that brings its own endpoint (gVisor's
// sharedmem.New). The agent's half of the protocol is SendLinkConfig and
// SendDialError (dial_linux.go); dial.go describes the protocol.
package shm
