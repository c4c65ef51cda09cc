// Package tuntap creates, attaches and inspects kernel TUN/TAP devices: the
// pod side of a kernel pod's link (a TAP device in the pod's network
// namespace) and the agent's uplink (a TUN device in the host's). It holds
// no packet I/O and links no netstack, so that the CNI plugin, which only
// makes devices, stays small; the agent drives the devices' fds with
// pkg/endpoint/tap's endpoint.
//
//	err := netns.Do(func(ns.NetNS) error {
//		f, err := tuntap.Open("eth0", tuntap.Options{VnetHdr: true, Offload: true, Persist: true})
//		...
//	})
package tuntap

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// VnetHdrLen is the size of struct virtio_net_hdr (without the
// num_buffers field of the mergeable-buffers variant): flags 1, gso_type 1,
// hdr_len 2, gso_size 2, csum_start 2, csum_offset 2 = 10 bytes.
const VnetHdrLen = 10

// tunDevice is the clone device that creates and attaches TUN/TAP devices.
const tunDevice = "/dev/net/tun"

// Options say how Open creates or attaches a TUN/TAP device.
type Options struct {
	// TUN opens an L3 TUN device (IFF_TUN: IP packets, no Ethernet header)
	// instead of a TAP device (IFF_TAP: Ethernet frames).
	TUN bool
	// VnetHdr puts a 10-byte struct virtio_net_hdr in front of every frame
	// in both directions (IFF_VNET_HDR), which carries checksum and
	// segmentation offload metadata. The TAP endpoint must then be
	// given its VnetHdr option.
	VnetHdr bool
	// Offload lets the kernel hand over frames with partial checksums and
	// TCP super-packets (TUNSETOFFLOAD: TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6,
	// TUN_F_TSO_ECN), which the reader completes and segments. Requires
	// VnetHdr. Without it Open clears any offload a previous owner of a
	// persistent device set.
	Offload bool
	// Persist sets TUNSETPERSIST so that the device outlives the fd: it
	// stays in its network namespace until it is deleted or the namespace
	// goes away, and Open can attach to it again by name. When false,
	// the persistence flag of an existing device is left as it is.
	Persist bool
	// MustExist makes Open fail with an error wrapping unix.ENODEV when
	// no interface called name exists in the current network namespace,
	// instead of creating one: the way to re-adopt a persistent device
	// without resurrecting one somebody deleted. The check and the attach
	// are two steps, not one atomic operation.
	MustExist bool
	// Exclusive makes Open fail with an error wrapping unix.EEXIST when
	// any interface called name exists in the current network namespace,
	// instead of attaching to it (IFF_TUN_EXCL): the way to create a
	// device and nothing else, the check and the creation one atomic
	// step. It excludes MustExist.
	Exclusive bool
}

// tapOffloadFlags are the TUNSETOFFLOAD flags Open sets with Offload.
// TSO_ECN is included because the TAP endpoint's segmentation clears CWR on
// all segments but the first, which is what an ECN-aware segmentation must
// do.
const tapOffloadFlags = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6 | unix.TUN_F_TSO_ECN

// Open opens /dev/net/tun in the calling thread's network namespace and
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
// device (see NetNS) or close the fd to let them go.
//
// To hand the fd to the TAP endpoint or send it over SCM_RIGHTS, read it with
// f.SyscallConn().Control rather than f.Fd, which would switch the file to
// blocking mode.
func Open(name string, opts Options) (*os.File, error) {
	if opts.Offload && !opts.VnetHdr {
		return nil, fmt.Errorf("open tap %q: offload needs the virtio-net header (VnetHdr)", name)
	}
	if opts.MustExist && opts.Exclusive {
		return nil, fmt.Errorf("open tap %q: MustExist and Exclusive exclude each other", name)
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
	if opts.Exclusive {
		flags |= unix.IFF_TUN_EXCL
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		if opts.Exclusive && errors.Is(err, unix.EBUSY) {
			// tun_set_iff's answer for an existing name with
			// IFF_TUN_EXCL, before it looks at the device's kind.
			return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w (an interface of that name exists)", name, unix.EEXIST)
		}
		if errors.Is(err, unix.EINVAL) {
			return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w (does it exist as another kind of device, or as tun vs tap?)", name, err)
		}
		return nil, fmt.Errorf("open tap %q: TUNSETIFF: %w", name, err)
	}
	if opts.VnetHdr {
		if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, VnetHdrLen); err != nil {
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

	info, err := Inspect(fd)
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

// Info describes the TUN/TAP device an fd is attached to.
type Info struct {
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

// Inspect returns what the kernel says about the device fd is attached
// to (TUNGETIFF, TUNGETVNETHDRSZ). It fails with EBADFD when the device is
// gone.
func Inspect(fd int) (Info, error) {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return Info{}, fmt.Errorf("inspect tap fd %d: %w", fd, err)
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return Info{}, fmt.Errorf("inspect tap fd %d: TUNGETIFF: %w", fd, err)
	}
	flags := ifr.Uint16()
	info := Info{
		Name:       ifr.Name(),
		TUN:        flags&unix.IFF_TUN != 0,
		VnetHdr:    flags&unix.IFF_VNET_HDR != 0,
		Persist:    flags&unix.IFF_PERSIST != 0,
		MultiQueue: flags&unix.IFF_MULTI_QUEUE != 0,
	}
	if info.VnetHdr {
		sz, err := unix.IoctlGetInt(fd, unix.TUNGETVNETHDRSZ)
		if err != nil {
			return Info{}, fmt.Errorf("inspect tap %q: TUNGETVNETHDRSZ: %w", info.Name, err)
		}
		info.VnetHdrSize = sz
	}
	return info, nil
}

// NetNS returns the network namespace of the device fd is attached to
// (TUNGETDEVNETNS), as a file usable with setns(2) or ns.GetNS
// ("/proc/self/fd/N"). It reaches the namespace even after its bind mount is
// gone, for example to delete the device of a pod whose namespace was
// removed while the agent held the fd.
func NetNS(fd int) (*os.File, error) {
	nsfd, err := unix.IoctlRetInt(fd, unix.TUNGETDEVNETNS)
	if err != nil {
		return nil, fmt.Errorf("tap fd %d: TUNGETDEVNETNS: %w", fd, err)
	}
	unix.CloseOnExec(nsfd)
	return os.NewFile(uintptr(nsfd), "netns"), nil
}
