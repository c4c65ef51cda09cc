package endpoint

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/rawfile"
)

// tunDevice is the clone device that creates and attaches TUN/TAP devices.
const tunDevice = "/dev/net/tun"

// TAPDeviceOptions say how OpenTAP creates or attaches a TUN/TAP device.
type TAPDeviceOptions struct {
	// TUN opens an L3 TUN device (IFF_TUN: IP packets, no Ethernet header)
	// instead of a TAP device (IFF_TAP: Ethernet frames).
	TUN bool
	// VnetHdr puts a 10-byte struct virtio_net_hdr in front of every frame
	// in both directions (IFF_VNET_HDR), which carries checksum and
	// segmentation offload metadata. NewTAP must then be given
	// TAPOptions.VnetHdr.
	VnetHdr bool
	// Offload lets the kernel hand over frames with partial checksums and
	// TCP super-packets (TUNSETOFFLOAD: TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6,
	// TUN_F_TSO_ECN), which the endpoint completes and segments. Requires
	// VnetHdr. Without it OpenTAP clears any offload a previous owner of a
	// persistent device set.
	Offload bool
	// Persist sets TUNSETPERSIST so that the device outlives the fd: it
	// stays in its network namespace until it is deleted or the namespace
	// goes away, and OpenTAP can attach to it again by name. When false,
	// the persistence flag of an existing device is left as it is.
	Persist bool
	// MustExist makes OpenTAP fail with an error wrapping unix.ENODEV when
	// no interface called name exists in the current network namespace,
	// instead of creating one: the way to re-adopt a persistent device
	// without resurrecting one somebody deleted. The check and the attach
	// are two steps, not one atomic operation.
	MustExist bool
}

// tapOffloadFlags are the TUNSETOFFLOAD flags OpenTAP sets with Offload.
// TSO_ECN is included because splitFrame clears CWR on all segments but the
// first, which is what an ECN-aware segmentation must do.
const tapOffloadFlags = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6 | unix.TUN_F_TSO_ECN

// OpenTAP opens /dev/net/tun in the calling thread's network namespace and
// creates the TAP (or TUN) device name, or attaches to it when it already
// exists. Run it inside the pod's namespace (ns.NetNS.Do) to make the device
// there. The returned file is non-blocking and close-on-exec; closing it
// deletes the device unless it is persistent.
//
// Re-opening an existing device works with the same call when nothing else
// holds it open (a device that is not multi-queue takes one fd at a time:
// otherwise EBUSY) and when TUN matches its type (otherwise EINVAL). The
// IFF_NO_PI and IFF_VNET_HDR flags of the device become the ones asked for
// here, and the offloads are set again, so a re-opened device behaves
// exactly like a new one.
//
// The fd holds a reference to the network namespace it was opened in: the
// namespace, and the device in it, live as long as the fd even after the
// namespace's last process exits and its bind mount is removed. Delete the
// device (see TAPNetNS) or close the fd to let them go.
//
// To hand the fd to NewTAP or send it over SCM_RIGHTS, read it with
// f.SyscallConn().Control rather than f.Fd, which would switch the file to
// blocking mode.
func OpenTAP(name string, opts TAPDeviceOptions) (*os.File, error) {
	if opts.Offload && !opts.VnetHdr {
		return nil, fmt.Errorf("open tap %q: offload needs the virtio-net header (VnetHdr)", name)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil || name == "" {
		return nil, fmt.Errorf("open tap %q: invalid interface name (1 to %d bytes)", name, unix.IFNAMSIZ-1)
	}
	if opts.MustExist {
		if _, err := net.InterfaceByName(name); err != nil {
			return nil, fmt.Errorf("open tap %q: %w (%v)", name, unix.ENODEV, err)
		}
	}

	fd, err := unix.Open(tunDevice, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open tap %q: open %s: %w", name, tunDevice, err)
	}
	success := false
	defer func() {
		if !success {
			unix.Close(fd)
		}
	}()

	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if opts.TUN {
		flags = unix.IFF_TUN | unix.IFF_NO_PI
	}
	if opts.VnetHdr {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w (does it exist as another kind of device, or as tun vs tap?)", name, err)
		}
		return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w", name, err)
	}
	if opts.VnetHdr {
		if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, virtioNetHdrLen); err != nil {
			return nil, fmt.Errorf("open tap %q: TUNSETVNETHDRSZ: %w", name, err)
		}
		// virtio 1.0 headers are little endian; this is the default on
		// little-endian hosts and must be asked for on the others.
		if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETLE, 1); err != nil {
			return nil, fmt.Errorf("open tap %q: TUNSETVNETLE: %w", name, err)
		}
	}
	offload := 0
	if opts.Offload {
		offload = tapOffloadFlags
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, offload); err != nil {
		return nil, fmt.Errorf("open tap %q: TUNSETOFFLOAD %#x: %w", name, offload, err)
	}
	if opts.Persist {
		if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
			return nil, fmt.Errorf("open tap %q: TUNSETPERSIST: %w", name, err)
		}
	}

	info, err := InspectTAP(fd)
	if err != nil {
		return nil, fmt.Errorf("open tap %q: %w", name, err)
	}
	if info.TUN != opts.TUN || info.VnetHdr != opts.VnetHdr {
		return nil, fmt.Errorf("open tap %q: device reports tun=%t vnet_hdr=%t, want tun=%t vnet_hdr=%t",
			name, info.TUN, info.VnetHdr, opts.TUN, opts.VnetHdr)
	}
	success = true
	// os.NewFile sees O_NONBLOCK and registers the fd with the runtime
	// poller.
	return os.NewFile(uintptr(fd), tunDevice+":"+name), nil
}

// TAPDeviceInfo describes the TUN/TAP device an fd is attached to.
type TAPDeviceInfo struct {
	// Name is the interface name.
	Name string
	// TUN is true for an L3 TUN device, false for a TAP device.
	TUN bool
	// VnetHdr is true when frames carry a virtio-net header, of
	// VnetHdrSize bytes.
	VnetHdr     bool
	VnetHdrSize int
	// Persist is true when the device outlives its fds.
	Persist bool
	// MultiQueue is true for an IFF_MULTI_QUEUE device.
	MultiQueue bool
}

// InspectTAP returns what the kernel says about the device fd is attached
// to (TUNGETIFF, TUNGETVNETHDRSZ). It fails with EBADFD when the device is
// gone.
func InspectTAP(fd int) (TAPDeviceInfo, error) {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return TAPDeviceInfo{}, fmt.Errorf("inspect tap fd %d: %w", fd, err)
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return TAPDeviceInfo{}, fmt.Errorf("inspect tap fd %d: TUNGETIFF: %w", fd, err)
	}
	flags := ifr.Uint16()
	info := TAPDeviceInfo{
		Name:       ifr.Name(),
		TUN:        flags&unix.IFF_TUN != 0,
		VnetHdr:    flags&unix.IFF_VNET_HDR != 0,
		Persist:    flags&unix.IFF_PERSIST != 0,
		MultiQueue: flags&unix.IFF_MULTI_QUEUE != 0,
	}
	if info.VnetHdr {
		sz, err := unix.IoctlGetInt(fd, unix.TUNGETVNETHDRSZ)
		if err != nil {
			return TAPDeviceInfo{}, fmt.Errorf("inspect tap %q: TUNGETVNETHDRSZ: %w", info.Name, err)
		}
		info.VnetHdrSize = sz
	}
	return info, nil
}

// TAPNetNS returns the network namespace of the device fd is attached to
// (TUNGETDEVNETNS), as a file usable with setns(2) or ns.GetNS
// ("/proc/self/fd/N"). It reaches the namespace even after its bind mount is
// gone, for example to delete the device of a pod whose namespace was
// removed while the agent held the fd.
func TAPNetNS(fd int) (*os.File, error) {
	nsfd, err := unix.IoctlRetInt(fd, unix.TUNGETDEVNETNS)
	if err != nil {
		return nil, fmt.Errorf("tap fd %d: TUNGETDEVNETNS: %w", fd, err)
	}
	unix.CloseOnExec(nsfd)
	return os.NewFile(uintptr(nsfd), "netns"), nil
}

// dupTAP duplicates the caller's TUN/TAP fd for the endpoint to own and
// describes its device. The duplicate is close-on-exec and non-blocking;
// O_NONBLOCK belongs to the open file description, which the caller's fd
// shares, so the caller's fd becomes non-blocking too.
func dupTAP(fd int) (int, TAPDeviceInfo, error) {
	info, err := InspectTAP(fd)
	if err != nil {
		return -1, TAPDeviceInfo{}, err
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, TAPDeviceInfo{}, fmt.Errorf("dup tap %q fd %d: %w", info.Name, fd, err)
	}
	if err := unix.SetNonblock(dup, true); err != nil {
		unix.Close(dup)
		return -1, TAPDeviceInfo{}, fmt.Errorf("set tap %q fd non-blocking: %w", info.Name, err)
	}
	return dup, info, nil
}

// writeIovec writes one frame with a single non-blocking writev. A TUN/TAP
// write takes the whole frame or nothing.
func writeIovec(fd int, iovs []unix.Iovec) unix.Errno {
	return rawfile.NonBlockingWriteIovec(fd, iovs)
}

// isDeviceGone reports whether a read error means the device is gone for
// good: it was deleted (EBADFD), went away with its namespace, or the fd
// was closed.
func isDeviceGone(err error) bool {
	return errors.Is(err, unix.EBADFD) || errors.Is(err, unix.EIO) ||
		errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODEV) ||
		errors.Is(err, unix.EBADF) || errors.Is(err, os.ErrClosed)
}

// tapReader reads frames from a TUN/TAP fd through the runtime poller
// (deadlines and all) with readv: into a pooled 64 KiB buffer.View, so that
// a frame that fits (every TCP super-packet the kernel's 64 KiB GSO limit
// makes, headers included) can be handed to the stack without a copy
// (take), and into a tail buffer for the few bytes of the largest frames,
// which are then copied into one contiguous buffer.
//
// A tapReader belongs to the reader goroutine.
type tapReader struct {
	rc   syscall.RawConn
	view *buffer.View // the current pooled buffer; nil after take
	tail []byte       // the bytes of a frame beyond view's chunk
	big  []byte       // a frame that did not fit view, made contiguous
	n    int          // length of the last frame read into view

	// readFn is the readv rc.Read runs, made once so that a read does not
	// allocate a closure; it reads into iovs and leaves its result in
	// got and errno.
	readFn func(fd uintptr) bool
	iovs   [2]unix.Iovec
	got    int
	errno  unix.Errno
}

// tapReadChunk is the pooled chunk size frames are read into: gVisor's
// largest pooled chunk (buffer.MaxChunkSize, 64 KiB).
const tapReadChunk = buffer.MaxChunkSize

func newTAPReader(f *os.File) (*tapReader, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &tapReader{
		rc:   rc,
		tail: make([]byte, readBufSize-tapReadChunk),
		big:  make([]byte, readBufSize),
	}
	r.readFn = func(fd uintptr) bool {
		r.got, r.errno = readv(int(fd), r.iovs[:])
		return r.errno != unix.EAGAIN
	}
	return r, nil
}

// read reads one frame and returns it as one slice, valid until the next
// read or take. It returns io.EOF at end of file, os.ErrDeadlineExceeded
// when a read deadline passed, and the kernel's error otherwise.
func (r *tapReader) read() ([]byte, error) {
	if r.view == nil {
		r.view = buffer.NewViewSize(tapReadChunk)
	}
	head := r.view.AsSlice()
	r.iovs = [2]unix.Iovec{{Base: &head[0]}, {Base: &r.tail[0]}}
	r.iovs[0].SetLen(len(head))
	r.iovs[1].SetLen(len(r.tail))
	r.got, r.errno = 0, 0
	err := r.rc.Read(r.readFn)
	n := r.got
	switch {
	case err != nil:
		return nil, err
	case r.errno != 0:
		return nil, r.errno
	case n == 0:
		return nil, io.EOF
	case n <= len(head):
		r.n = n
		return head[:n], nil
	}
	r.n = 0
	copy(r.big, head)
	copy(r.big[len(head):], r.tail[:n-len(head)])
	return r.big[:n], nil
}

// take hands over the bytes [off, off+n) of the frame last read, when that
// frame is in the pooled view, as a view the caller owns; the next read
// gets a fresh one. It returns nil when the frame was copied (read's big
// buffer): the caller copies.
func (r *tapReader) take(off, n int) *buffer.View {
	if r.view == nil || r.n == 0 || off < 0 || off+n > r.n {
		return nil
	}
	v := r.view
	r.view = nil
	v.CapLength(off + n)
	v.TrimFront(off)
	return v
}

// release returns the pooled view.
func (r *tapReader) release() {
	if r.view != nil {
		r.view.Release()
		r.view = nil
	}
}
