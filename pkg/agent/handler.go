package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/ipam"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
)

// ServeAgent implements agentapi.Handler.ServeAgent.
func (a *Agent) ServeAgent(ctx context.Context, req *agentapi.Request, files []*os.File) (*agentapi.Response, error) {
	// Everything the agent keeps is a duplicate.
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	switch req.Op {
	case agentapi.OpAttach:
		start := time.Now()
		resp, err := a.attach(req.Attach, files)
		a.metrics.observeAttach(req.Attach.Kind, err, time.Since(start))
		return resp, err
	case agentapi.OpDetach:
		return nil, a.detach(req.Detach.Key())
	case agentapi.OpCheck:
		return nil, a.check(req.Check)
	case agentapi.OpStatus:
		return a.status(), nil
	case agentapi.OpGC:
		return a.gc(req.GC)
	}
	return nil, &agentapi.Error{Code: agentapi.CodeInvalidConfig, Msg: "unknown operation", Details: req.Op}
}

// attach creates the attachment of req, whose resources are files.
//
// It runs in two steps. Under the operation lock it checks, takes the
// addresses (in memory), brings the link up and publishes the attachment.
// Then, without the lock, it makes the addresses and the record durable:
// concurrent attaches share those writes (one IPAM state write for all the
// addresses taken meanwhile; the records' fsyncs in the same journal
// commits) instead of queueing behind each other's. Until the reply, the
// pod has no address to use; a crash before it leaves at most addresses or
// a record that the runtime's DEL (or GC) releases. If the second step
// fails, the attachment is undone.
func (a *Agent) attach(req *agentapi.AttachRequest, files []*os.File) (*agentapi.Response, error) {
	k := req.Key()
	if !a.isReady() {
		return nil, &agentapi.Error{Code: agentapi.CodeTryAgainLater, Msg: "agent is not ready"}
	}
	att, commit, err := a.attachLink(k, req, files)
	if err != nil {
		return nil, attachError(k, err)
	}
	if err := commit(); err != nil {
		a.opMu.Lock()
		a.abortAttach(k, att)
		a.opMu.Unlock()
		return nil, attachError(k, err)
	}
	rec := att.rec
	ips, routes := ipConfigs(rec.Addrs)
	resp := &agentapi.AttachResponse{
		IPs:        ips,
		Routes:     routes,
		MTU:        rec.MTU,
		GatewayMAC: net.HardwareAddr(GatewayMAC).String(),
	}
	att.link.answer(resp)
	att.log.Info("attached", "kind", rec.Kind, "addrs", rec.Addrs, "pod", rec.PodNS+"/"+rec.PodName,
		"podMAC", rec.PodMAC, "mtu", rec.MTU, "socket", resp.SocketPath)
	return &agentapi.Response{Attach: resp}, nil
}

// attachError is err as the agent answers a failed attach of k.
func attachError(k linkspec.Key, err error) error {
	var ae *agentapi.Error
	if errors.As(err, &ae) {
		return fmt.Errorf("attach %s: %w", k, err)
	}
	if errors.Is(err, ipam.ErrExhausted) {
		return &agentapi.Error{Code: agentapi.CodeAddressExhausted, Msg: "no free pod address", Details: fmt.Sprintf("attach %s: %v", k, err)}
	}
	return &agentapi.Error{Code: agentapi.CodeAttachFailed, Msg: "attach failed", Details: fmt.Sprintf("attach %s: %v", k, err)}
}

// attachLink is attach's first step, under the operation lock: it takes
// the addresses, brings the link up and publishes the attachment. commit,
// run without the lock, makes the addresses and the record durable.
func (a *Agent) attachLink(k linkspec.Key, req *agentapi.AttachRequest, files []*os.File) (att *attachment, commit func() error, err error) {
	a.opMu.Lock()
	defer a.opMu.Unlock()
	a.mu.Lock()
	_, exists := a.attachments[k]
	a.mu.Unlock()
	if exists {
		return nil, nil, fmt.Errorf("attachment exists (detach it first)")
	}

	rec := &record{
		Version:     recordVersion,
		ContainerID: req.ContainerID,
		IfName:      req.IfName,
		Kind:        req.Kind,
		Netns:       req.Netns,
		Network:     req.Network,
		PodNS:       req.PodNamespace,
		PodName:     req.PodName,
		MTU:         req.MTU,
		PodMAC:      req.MAC,
	}
	if req.Bandwidth != nil && !req.Bandwidth.IsZero() {
		bw := *req.Bandwidth
		rec.Bandwidth = &bw
	}
	kind, err := kindOf(req.Kind)
	if err != nil {
		return nil, nil, invalid("%v", err)
	}
	if err := kind.prepare(a, k, rec, req); err != nil {
		return nil, nil, err
	}

	success := false
	commitAddrs := func() error { return nil }
	if len(req.IPs) > 0 {
		for _, s := range req.IPs {
			p, _ := netip.ParsePrefix(s) // checked by agentapi
			rec.Addrs = append(rec.Addrs, p.Addr())
		}
		slices.SortStableFunc(rec.Addrs, func(x, y netip.Addr) int { return boolCmp(y.Is4(), x.Is4()) })
	} else {
		addrs, commit, err := a.ipam.Reserve(k)
		if err != nil {
			return nil, nil, err
		}
		rec.Addrs, rec.Allocated, commitAddrs = addrs, true, commit
		defer func() {
			if !success {
				if err := a.ipam.Release(k); err != nil {
					a.log.Error("release addresses of a failed attach", "attachment", k, "err", err)
				}
			}
		}()
	}

	link, err := kind.attach(a, rec, files)
	if err != nil {
		return nil, nil, err
	}
	att = &attachment{rec: rec, log: a.log.With("link", k.String()), link: link}
	// Encoded now: the record may change once published (a TAP device
	// that goes away, say).
	b, err := encodeRecord(rec)
	if err != nil {
		att.stop()
		return nil, nil, err
	}
	a.mu.Lock()
	a.attachments[k] = att
	a.mu.Unlock()
	a.attachmentsChanged()
	success = true
	return att, func() error {
		if err := commitAddrs(); err != nil {
			return err
		}
		return a.store.write(k, b)
	}, nil
}

// abortAttach undoes the attachment att of k whose commit failed, unless
// a DEL removed it meanwhile.
//
// +checklocks:a.opMu
func (a *Agent) abortAttach(k linkspec.Key, att *attachment) {
	a.mu.Lock()
	cur := a.attachments[k]
	a.mu.Unlock()
	if cur != att {
		return
	}
	if err := a.detachLocked(k); err != nil {
		a.log.Error("undo a failed attach", "attachment", k, "err", err)
	}
}

// socketUser returns the attachment whose sandbox socket is path, if any.
func (a *Agent) socketUser(path string) *linkspec.Key {
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, att := range a.attachments {
		if att.link.socketPath() == path {
			return &k
		}
	}
	return nil
}

// detach removes k's attachment: link, descriptors, socket, addresses (when
// the agent allocated them) and record. An unknown attachment is a success:
// DEL may be called several times.
//
// What the link holds on the node goes without the operation lock
// (podLink.release): deleting a veth pair waits for the kernel (about 25 ms
// on the benchmark's machine), and a hundred pods' DELs queued behind each
// other's deletions took seconds. The attachment, stopped, stays published
// meanwhile, so its addresses are not handed out again before the host's
// routes to them are gone with the device.
func (a *Agent) detach(k linkspec.Key) error {
	a.opMu.Lock()
	att := a.attachment(k)
	if att == nil {
		defer a.opMu.Unlock()
		return a.forget(k)
	}
	att.stop()
	a.opMu.Unlock()
	att.link.release()
	a.opMu.Lock()
	defer a.opMu.Unlock()
	if a.attachment(k) != att {
		// Another detach (a retried DEL, GC) finished it meanwhile.
		return nil
	}
	return a.finishDetach(k, att)
}

// attachment returns k's attachment, or nil.
func (a *Agent) attachment(k linkspec.Key) *attachment {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.attachments[k]
}

// forget releases what an unknown attachment k may still hold: addresses
// and a record a crash left between allocation and record.
//
// +checklocks:a.opMu
func (a *Agent) forget(k linkspec.Key) error {
	if err := a.ipam.Release(k); err != nil {
		return fmt.Errorf("detach %s: %w", k, err)
	}
	return a.store.remove(k)
}

// detachLocked is detach with the operation lock held throughout (GC, an
// attach undone).
//
// +checklocks:a.opMu
func (a *Agent) detachLocked(k linkspec.Key) error {
	att := a.attachment(k)
	if att == nil {
		return a.forget(k)
	}
	att.stop()
	att.link.release()
	return a.finishDetach(k, att)
}

// finishDetach releases the addresses and the record of k's attachment
// att, stopped and released, and unpublishes it.
//
// +checklocks:a.opMu
func (a *Agent) finishDetach(k linkspec.Key, att *attachment) error {
	if att.rec.Allocated {
		// On failure the attachment stays, stopped, for a retried DEL.
		if err := a.ipam.Release(k); err != nil {
			return fmt.Errorf("detach %s: %w", k, err)
		}
	}
	if err := a.store.remove(k); err != nil {
		return fmt.Errorf("detach %s: %w", k, err)
	}
	a.mu.Lock()
	delete(a.attachments, k)
	a.mu.Unlock()
	a.attachmentsChanged()
	att.log.Info("detached")
	return nil
}

// check verifies that the attachment exists, holds the IPs given, enforces
// the bandwidth limit given (when given) and, for a tap link, still has its
// device.
func (a *Agent) check(req *agentapi.CheckRequest) error {
	k := req.Key()
	a.mu.Lock()
	att := a.attachments[k]
	a.mu.Unlock()
	noSuch := func(format string, args ...any) error {
		return &agentapi.Error{Code: agentapi.CodeNoSuchAttachment, Msg: "attachment check failed",
			Details: fmt.Sprintf("%s: %s", k, fmt.Sprintf(format, args...))}
	}
	if att == nil {
		return noSuch("no such attachment")
	}
	if len(req.IPs) > 0 {
		var want []netip.Addr
		for _, s := range req.IPs {
			p, _ := netip.ParsePrefix(s) // checked by agentapi
			want = append(want, p.Addr())
		}
		if missing, extra := diffAddrs(want, att.rec.Addrs); len(missing) > 0 || len(extra) > 0 {
			return noSuch("addresses differ: the agent has %v, not %v; it lacks %v", att.rec.Addrs, extra, missing)
		}
	}
	if req.Bandwidth != nil {
		var have linkspec.Bandwidth
		if att.rec.Bandwidth != nil {
			have = *att.rec.Bandwidth
		}
		if have != *req.Bandwidth {
			return noSuch("bandwidth limit differs: the agent enforces %s, not %s", have, *req.Bandwidth)
		}
	}
	if err := att.link.check(); err != nil {
		return noSuch("%v", err)
	}
	return nil
}

// diffAddrs returns the addresses of want missing from have, and those of
// have not in want.
func diffAddrs(want, have []netip.Addr) (missing, extra []netip.Addr) {
	for _, w := range want {
		if !slices.Contains(have, w) {
			missing = append(missing, w)
		}
	}
	for _, h := range have {
		if !slices.Contains(want, h) {
			extra = append(extra, h)
		}
	}
	return missing, extra
}

// status reports readiness.
func (a *Agent) status() *agentapi.Response {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := &agentapi.StatusResponse{Ready: a.ready, Attachments: len(a.attachments)}
	if !st.Ready {
		st.Reason = "agent is starting or stopping"
	}
	return &agentapi.Response{Status: st}
}

// gc detaches every attachment not in req.Valid and releases every address
// allocation not in it.
func (a *Agent) gc(req *agentapi.GCRequest) (*agentapi.Response, error) {
	valid := make(map[linkspec.Key]bool, len(req.Valid))
	owners := make([]ipam.Owner, 0, len(req.Valid))
	for _, v := range req.Valid {
		valid[v] = true
		owners = append(owners, v)
	}
	a.opMu.Lock()
	defer a.opMu.Unlock()
	a.mu.Lock()
	var stale []linkspec.Key
	for k := range a.attachments {
		if !valid[k] {
			stale = append(stale, k)
		}
	}
	a.mu.Unlock()
	slices.SortFunc(stale, func(x, y linkspec.Key) int { return strings.Compare(x.String(), y.String()) })

	resp := &agentapi.GCResponse{Released: []agentapi.Attachment{}}
	released := make(map[linkspec.Key]bool)
	var errs []error
	for _, k := range stale {
		if err := a.detachLocked(k); err != nil {
			errs = append(errs, err)
			continue
		}
		released[k] = true
		resp.Released = append(resp.Released, k)
	}
	// Keep the allocations of attachments whose detach failed.
	for _, k := range stale {
		if !released[k] {
			owners = append(owners, k)
		}
	}
	freed, err := a.ipam.ReleaseExcept(owners)
	if err != nil {
		errs = append(errs, err)
	}
	for _, al := range freed {
		k := al.Owner
		if !released[k] {
			resp.Released = append(resp.Released, k)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("gc: %w", err)
	}
	a.log.Info("gc done", "valid", len(req.Valid), "released", len(resp.Released))
	return &agentapi.Response{GC: resp}, nil
}

func boolCmp(x, y bool) int {
	switch {
	case x == y:
		return 0
	case x:
		return 1
	}
	return -1
}
