package linkspec

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"unicode"
)

// MaxIfNameLen is the longest interface name Linux accepts: IFNAMSIZ (16)
// less the terminating NUL.
const MaxIfNameLen = 15

// CheckIfName accepts what the kernel's dev_valid_name accepts: 1 to
// MaxIfNameLen bytes, not "." or "..", no '/', ':', white space or NUL.
func CheckIfName(name string) error {
	switch {
	case name == "":
		return errors.New("empty")
	case len(name) > MaxIfNameLen:
		return fmt.Errorf("longer than %d bytes", MaxIfNameLen)
	case name == "." || name == "..":
		return errors.New("reserved name")
	}
	for _, r := range name {
		if r == '/' || r == ':' || r == 0 || unicode.IsSpace(r) {
			return errors.New("contains '/', ':', white space or NUL")
		}
	}
	return nil
}

// HostVethPrefix starts the name of every host-side veth device of a
// kernel pod's veth link (HostVethName), so that the host's firewall
// rules can match them all ("shmv*" in nftables, "shmv+" in iptables).
const HostVethPrefix = "shmv"

// HostVethName is the host side's name of k's veth link: HostVethPrefix
// and the first 11 hex digits of the SHA-256 of k (4 + 11 = MaxIfNameLen
// bytes), as the plugin creates it and the agent finds it. 44 bits make a
// collision between two pods of a node unlikely (about 1 in 10^8 with
// 250 pods); the plugin's creation is exclusive, so a collision fails
// the ADD rather than taking another pod's device.
func HostVethName(k Key) string {
	return hostName(HostVethPrefix, k)
}

// HostIfbPrefix starts the name of the ifb device that carries a veth
// link's egress bandwidth limit (HostIfbName).
const HostIfbPrefix = "shmb"

// HostIfbName is the name of the ifb device of k's veth link when the pod
// has an egress bandwidth limit: the agent redirects what the pod sends to
// it and shapes it there, as the reference bandwidth plugin does. It has
// the same digest as HostVethName, so one is found from the other.
func HostIfbName(k Key) string {
	return hostName(HostIfbPrefix, k)
}

// hostName is prefix and as many hex digits of the SHA-256 of k as fill
// MaxIfNameLen.
func hostName(prefix string, k Key) string {
	sum := sha256.Sum256([]byte(k.String()))
	return prefix + hex.EncodeToString(sum[:])[:MaxIfNameLen-len(prefix)]
}
