package node

import "context"

// WaitLine returns the sandbox's next stdout line starting with prefix,
// skipping others: "ready" once a server listens. It fails when the
// sandbox exits first or ctx ends.
func (s *Sandbox) WaitLine(ctx context.Context, prefix string) (string, error) {
	return s.nextLine(ctx, prefix)
}

// StopServer stops the sandbox server Transfer started on the pod's link,
// if one runs, so that the link is free for another sandbox or client.
func (p *Pod) StopServer() { p.stopServer() }
