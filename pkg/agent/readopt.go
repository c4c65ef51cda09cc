package agent

import (
	"errors"
	"fmt"

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
		link, err := a.readoptLink(rec)
		att := &attachment{rec: rec, log: log, link: link}
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
