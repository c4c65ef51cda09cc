package agent

import (
	"errors"
	"fmt"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/ipam"
)

// readopt loads the attachments a previous agent recorded and brings them
// back: a tap link's device is re-opened in its netns and attached again; a
// shm link gets its socket back (with a fresh pair at the sandbox's next
// connection). An attachment whose netns or device is gone is released
// (addresses, record). One that fails otherwise is kept without a link, so
// that DEL or GC still release it, and logged. Finally every IPAM
// allocation without a record (a crash between allocation and record) is
// released.
func (a *Agent) readopt() error {
	a.opMu.Lock()
	defer a.opMu.Unlock()
	recs, bad, err := a.store.load()
	if err != nil {
		return err
	}
	for _, err := range bad {
		a.log.Error("unreadable attachment record left in place", "err", err)
	}
	var keep []ipam.Owner
	for _, rec := range recs {
		k := rec.key()
		log := a.log.With("link", k.String())
		att, err := a.readoptOne(rec)
		switch {
		case errors.Is(err, errGone):
			log.Info("attachment gone while the agent was down; releasing it", "reason", err)
			if err := a.releaseRecord(rec); err != nil {
				log.Error("release gone attachment", "err", err)
				keep = append(keep, k)
			}
			continue
		case err != nil:
			log.Error("cannot re-adopt attachment; keeping it without a link until DEL or GC", "err", err)
			att = &attachment{rec: rec, linkID: k.String(), router: a.router, log: log}
			att.stopped.Store(true)
		default:
			log.Info("attachment re-adopted", "kind", rec.Kind, "addrs", rec.Addrs)
		}
		keep = append(keep, k)
		a.mu.Lock()
		a.attachments[k] = att
		a.mu.Unlock()
	}
	freed, err := a.ipam.ReleaseExcept(keep)
	if err != nil {
		return fmt.Errorf("release addresses without attachment: %w", err)
	}
	for _, al := range freed {
		a.log.Info("released addresses without attachment", "owner", al.Owner.String(), "addrs", al.Addrs)
	}
	return nil
}

// readoptOne brings one recorded attachment back.
func (a *Agent) readoptOne(rec *record) (*attachment, error) {
	switch rec.Kind {
	case agentapi.KindTap:
		f, err := reopenTAP(rec)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return a.attachTAP(rec, f)
	case agentapi.KindShm:
		// The sandbox lives in the pod's netns (its placeholder
		// interface too): without it, nobody will dial the link.
		if err := checkNetns(rec.Netns); err != nil {
			return nil, err
		}
		return a.startShm(rec, nil, sandboxSocketPath(a.cfg.SandboxDir, rec.key()))
	}
	return nil, fmt.Errorf("unknown kind %q", rec.Kind)
}

// releaseRecord releases a recorded attachment that has no live resources.
func (a *Agent) releaseRecord(rec *record) error {
	k := rec.key()
	if rec.Allocated {
		if err := a.ipam.Release(k); err != nil {
			return err
		}
	}
	return a.store.remove(k)
}
