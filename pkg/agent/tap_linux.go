package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync/atomic"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/endpoint/tap"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/tuntap"
)

// tapKind is the kind of a kernel pod's link: a TAP device in the pod's
// netns whose fd the CNI plugin sends and the agent drives.
type tapKind struct{}

// prepare implements linkKind.prepare: a TAP link takes the agent's MTU
// unless the conflist sets one.
func (tapKind) prepare(a *Agent, _ linkspec.Key, rec *record, _ *agentapi.AttachRequest) error {
	if rec.MTU == 0 {
		rec.MTU = a.cfg.MTU
	}
	return nil
}

// attach implements linkKind.attach: files[0] is the TAP fd.
func (tapKind) attach(a *Agent, rec *record, files []*os.File) (podLink, error) {
	return a.attachTAP(rec, files[0])
}

// readopt implements linkKind.readopt: the persistent device is re-opened
// in the pod's netns.
func (tapKind) readopt(a *Agent, rec *record) (podLink, error) {
	f, err := reopenTAP(rec)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return a.attachTAP(rec, f)
}

// orphan implements linkKind.orphan: without its endpoint the link has
// no device.
func (tapKind) orphan(_ *Agent, rec *record) podLink {
	return noLink{checkErr: tapGoneError(rec)}
}

// tapGoneError is what CHECK says of a TAP link without its device.
func tapGoneError(rec *record) error {
	return fmt.Errorf("the TAP device %s is gone", rec.TAPName)
}

// tapLink is a kernel pod's link: the router drives its TAP device through
// ep.
type tapLink struct {
	a      *Agent        // immutable
	rec    *record       // immutable
	linkID string        // the router link's id; immutable
	log    *slog.Logger  // immutable
	ep     *tap.Endpoint // immutable once attachTAP returned
	// gone is set when the TAP device went away under the endpoint.
	gone atomic.Bool
	// stopped is set by stop.
	stopped atomic.Bool
}

// attachTAP drives the TAP device f is attached to as rec's link. It fills
// in rec's device fields (and PodMAC when empty, from the device). f stays
// the caller's: the endpoint keeps a duplicate.
func (a *Agent) attachTAP(rec *record, f *os.File) (*tapLink, error) {
	id := rec.key().String()
	l := &tapLink{a: a, rec: rec, linkID: id, log: a.log.With("link", id)}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, invalid("tap fd: %v", err)
	}
	var ep *tap.Endpoint
	var opErr error
	// Control, not Fd: Fd would make the file blocking.
	if err := rc.Control(func(fd uintptr) {
		info, err := tuntap.Inspect(int(fd))
		if err != nil {
			opErr = invalid("tap fd: %v", err)
			return
		}
		if info.TUN {
			opErr = invalid("tap fd: device %s is a TUN device, want TAP", info.Name)
			return
		}
		if err := sameNetNS(int(fd), rec.Netns); err != nil {
			opErr = invalid("tap fd: device %s: %v", info.Name, err)
			return
		}
		rec.TAPName, rec.VnetHdr = info.Name, info.VnetHdr
		if rec.PodMAC == "" {
			mac, err := tapMAC(int(fd), info.Name)
			if err != nil {
				opErr = fmt.Errorf("pod MAC of %s: %w", info.Name, err)
				return
			}
			rec.PodMAC = mac.String()
		}
		// No GSOMaxSize: the router terminates no TCP. Forwarding: the
		// pod's TCP super-packets cross the router whole, and forwarded
		// packets keep their checksums (tap.Options.Forwarding).
		ep, opErr = tap.New(tap.Options{
			FD:             int(fd),
			MTU:            uint32(rec.MTU),
			EthernetHeader: true,
			LinkAddress:    GatewayMAC,
			VnetHdr:        info.VnetHdr,
			Forwarding:     true,
			RxLimit:        a.cfg.LinkRxLimit,
			Poll:           a.cfg.pollOption(),
			OnClosed:       l.deviceGone,
			Logger:         l.log,
		})
	}); err != nil {
		return nil, invalid("tap fd: %v", err)
	}
	if opErr != nil {
		return nil, opErr
	}
	l.ep = ep
	if err := a.router.AddLink(l.linkID, ep, rec.routerLink()); err != nil {
		// AddLink does not always close the endpoint on failure.
		ep.Close()
		ep.Wait()
		return nil, err
	}
	return l, nil
}

// deviceGone runs on the endpoint's goroutine when the TAP device went away
// (deleted, or its netns destroyed): the link leaves the router, from
// another goroutine because RemoveLink waits for the endpoint. The
// attachment stays until DEL or GC.
func (l *tapLink) deviceGone(reason error) {
	l.gone.Store(true)
	a := l.a
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		l.log.Warn("TAP device went away; link removed until the pod is deleted", "reason", reason)
		a.opMu.Lock()
		defer a.opMu.Unlock()
		if !l.stopped.Load() {
			if err := a.router.RemoveLink(l.linkID); err != nil {
				l.log.Warn("remove link", "err", err)
			}
		}
	}()
}

// stop implements podLink.stop. RemoveLink closes the TAP endpoint and
// with it the TAP fd.
func (l *tapLink) stop() {
	l.stopped.Store(true)
	if err := l.a.router.RemoveLink(l.linkID); err != nil {
		l.log.Warn("remove link", "err", err)
	}
}

// release implements podLink.release: the TAP device goes with the pod's
// netns (or DEL).
func (l *tapLink) release() {}

// check implements podLink.check.
func (l *tapLink) check() error {
	if l.gone.Load() {
		return tapGoneError(l.rec)
	}
	return nil
}

// answer implements podLink.answer: the pod's TAP device keeps its own
// MAC; the plugin learns the gateway's.
func (l *tapLink) answer(resp *agentapi.AttachResponse) { resp.MAC = resp.GatewayMAC }

// status implements podLink.status.
func (l *tapLink) status(st *LinkStatus) {
	if ls, err := l.a.router.LinkStats(l.linkID); err == nil {
		st.Up = true
		st.Router = &ls
	}
	es := l.ep.Stats().Snapshot()
	st.Endpoint = &es
}

// socketPath implements podLink.socketPath: a TAP link has none.
func (l *tapLink) socketPath() string { return "" }

// reopenTAP re-opens rec's persistent TAP device inside its netns. It
// returns errGone when the netns or the device no longer exists.
func reopenTAP(rec *record) (*os.File, error) {
	var f *os.File
	err := ns.WithNetNSPath(rec.Netns, func(ns.NetNS) error {
		var err error
		f, err = tuntap.Open(rec.TAPName, tuntap.Options{
			VnetHdr: rec.VnetHdr,
			// The endpoint segments what the kernel sends with
			// offloads; a virtio-net header is all it needs.
			Offload:   rec.VnetHdr,
			MustExist: true,
		})
		return err
	})
	var notExist ns.NSPathNotExistErr
	var notNS ns.NSPathNotNSErr
	switch {
	case err == nil:
		return f, nil
	case errors.As(err, &notExist), errors.As(err, &notNS):
		return nil, fmt.Errorf("%w: netns %s: %v", errGone, rec.Netns, err)
	case errors.Is(err, unix.ENODEV):
		return nil, fmt.Errorf("%w: device %s in %s: %v", errGone, rec.TAPName, rec.Netns, err)
	}
	return nil, fmt.Errorf("re-open %s in %s: %w", rec.TAPName, rec.Netns, err)
}

// errGone says a re-adopted attachment's netns or device no longer exists.
var errGone = errors.New("gone")

// tapMAC reads the MAC of the device name in the netns of the TAP fd.
func tapMAC(fd int, name string) (net.HardwareAddr, error) {
	nsf, err := tuntap.NetNS(fd)
	if err != nil {
		return nil, err
	}
	defer nsf.Close()
	h, err := netlink.NewHandleAt(netns.NsHandle(nsf.Fd()))
	if err != nil {
		return nil, fmt.Errorf("netlink in the pod netns: %w", err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", name, err)
	}
	mac := l.Attrs().HardwareAddr
	if len(mac) != 6 {
		return nil, fmt.Errorf("link %s has no Ethernet address", name)
	}
	return mac, nil
}

// sameNetNS refuses a TAP fd whose device is in another network namespace
// than netns (attach.netns): the agent re-opens the device by name in
// netns after a restart, and CHECK looks for it there. A netns path the
// agent cannot stat is left to the caller (the agent may not see every
// runtime's paths).
func sameNetNS(fd int, netns string) error {
	nsf, err := tuntap.NetNS(fd)
	if err != nil {
		return err
	}
	defer nsf.Close()
	var dev, want unix.Stat_t
	if err := unix.Fstat(int(nsf.Fd()), &dev); err != nil {
		return fmt.Errorf("netns of the device: %w", err)
	}
	if err := unix.Stat(netns, &want); err != nil {
		return nil
	}
	if dev.Dev != want.Dev || dev.Ino != want.Ino {
		return fmt.Errorf("in another network namespace than attach.netns %q", netns)
	}
	return nil
}

// macOf converts a MAC string checked earlier (agentapi validation, or our
// own formatting) to a link address; an invalid one yields "".
func macOf(s string) tcpip.LinkAddress {
	hw, err := net.ParseMAC(s)
	if err != nil || len(hw) != 6 {
		return ""
	}
	return tcpip.LinkAddress(hw)
}

// fileFD returns f's descriptor without switching it to blocking mode, as
// f.Fd would (that flag is shared with the sender's descriptor). f must stay
// open while the descriptor is used.
func fileFD(f *os.File) int {
	fd := -1
	if rc, err := f.SyscallConn(); err == nil {
		rc.Control(func(u uintptr) { fd = int(u) })
	}
	return fd
}

// invalid is an attach error with CodeInvalidConfig.
func invalid(format string, args ...any) error {
	return &agentapi.Error{Code: agentapi.CodeInvalidConfig, Msg: "invalid attach request", Details: fmt.Sprintf(format, args...)}
}
