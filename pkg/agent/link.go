package agent

import (
	"fmt"
	"os"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// podLink is a pod's link as an attachment holds it, whatever its kind: a
// kernel pod's TAP device (tapLink, tap_linux.go) or veth pair (vethLink,
// veth_linux.go), or a sandbox's shared-memory link (sandboxLink,
// sandbox.go). The handlers, re-adoption
// and the HTTP endpoints speak to a link only through it.
type podLink interface {
	// stop removes the link from the router and releases its descriptors
	// (and socket). It is called once, with the agent's opMu held (or by
	// the only owner of the link).
	stop()
	// release gives back what the link holds on the node beyond the
	// agent's life, once the attachment goes (DEL, GC; not when the agent
	// stops): a veth link's host side. It runs after stop, with or
	// without the opMu (a DEL's runs without: it may wait for the
	// kernel), and may run again or concurrently with itself (a retried
	// DEL, GC).
	release()
	// check says why the link cannot carry the pod's traffic any more (its
	// TAP device went away), or nil.
	check() error
	// answer fills in what the pod needs of its link in the attach answer:
	// the MAC of its interface, a sandbox's socket.
	answer(resp *agentapi.AttachResponse)
	// status fills in the link's part of its LinkStatus: up, counters,
	// socket.
	status(st *LinkStatus)
	// socketPath is the sandbox socket the link serves, or "".
	socketPath() string
}

// linkKind is what the agent does for one kind of pod link. The kinds are
// chosen in one place, kindOf.
type linkKind interface {
	// prepare checks and completes a new link's record before any address
	// is taken (MTU, queue sizes, socket).
	prepare(a *Agent, k linkspec.Key, rec *record, req *agentapi.AttachRequest) error
	// attach brings rec's link up from the resources the CNI plugin sent
	// (files, the caller's); rec holds its addresses.
	attach(a *Agent, rec *record, files []*os.File) (podLink, error)
	// readopt brings a recorded link back after an agent restart. It
	// returns an error wrapping errGone when the pod's netns or device no
	// longer exists.
	readopt(a *Agent, rec *record) (podLink, error)
	// orphan is the link kept for a recorded attachment that could not be
	// re-adopted, until DEL or GC removes it.
	orphan(a *Agent, rec *record) podLink
}

// kindOf returns the linkKind of a record's or a request's kind: where the
// agent decides a link's kind.
func kindOf(kind string) (linkKind, error) {
	switch kind {
	case agentapi.KindTap:
		return tapKind{}, nil
	case agentapi.KindShm:
		return sandboxKind{}, nil
	case agentapi.KindVeth:
		return vethKind{}, nil
	}
	return nil, fmt.Errorf("unknown kind %q", kind)
}

// readoptLink brings rec's link back after an agent restart
// (linkKind.readopt). When that fails for another reason than errGone, it
// returns the error and the link to keep in its place (linkKind.orphan).
func (a *Agent) readoptLink(rec *record) (podLink, error) {
	kind, err := kindOf(rec.Kind)
	if err != nil {
		return noLink{}, err
	}
	l, err := kind.readopt(a, rec)
	if err != nil {
		return kind.orphan(a, rec), err
	}
	return l, nil
}

// noLink stands for a link that could not be re-adopted: it is not up, and
// CHECK reports checkErr.
type noLink struct{ checkErr error }

func (noLink) stop()                           {}
func (noLink) release()                        {}
func (l noLink) check() error                  { return l.checkErr }
func (noLink) answer(*agentapi.AttachResponse) {}
func (noLink) status(*LinkStatus)              {}
func (noLink) socketPath() string              { return "" }
