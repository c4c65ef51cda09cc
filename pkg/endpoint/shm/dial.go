package shm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

// The dial protocol: how a sandbox gets its link from the node agent.
//
// The agent listens on one unix SOCK_SEQPACKET socket per sandbox link (its
// path is the socketPath of the CNI result). A sandbox connects and reads
// exactly one record: a JSON LinkConfig with, attached as SCM_RIGHTS, the
// queue.FDsPerPair descriptors of a fresh queue pair (queue.Pair.FDs order).
// Neither side writes anything else, but for one byte a sandbox may write
// to take an offload the config offers (LinkConfig.RxGSO): from then on the
// connection only tells each side that the other is alive (end of file
// means it is gone, see Options.PeerFD). A refused connection gets a LinkConfig whose
// Error is set and no descriptors.

// LinkConfigVersion is the version of the dial protocol in LinkConfig.Version.
const LinkConfigVersion = 1

// MaxLinkConfigSize bounds the link config record: 16 KiB.
const MaxLinkConfigSize = 16 << 10

// LinkConfig is what a sandbox needs to configure its netstack for its link.
type LinkConfig struct {
	// Version is LinkConfigVersion.
	Version int `json:"version"`
	// Error, when set, says why the agent refused the connection (for
	// example: another sandbox holds the link). Nothing else is set then.
	Error string `json:"error,omitempty"`
	// MAC is the sandbox side's MAC, for its NIC (Options.LinkAddress).
	MAC string `json:"mac,omitempty"`
	// GatewayMAC is the agent side's MAC: the link-layer address of every
	// gateway, to be installed as a static neighbor.
	GatewayMAC string `json:"gatewayMac,omitempty"`
	// MTU is the link's MTU.
	MTU uint32 `json:"mtu,omitempty"`
	// BufferSize is the queue pair's buffer size.
	BufferSize uint32 `json:"bufferSize,omitempty"`
	// Addresses are the sandbox's addresses with their prefix lengths
	// (10.244.1.5/32, 2001:db8::5/128).
	Addresses []netip.Prefix `json:"addresses,omitempty"`
	// Routes are the sandbox's routes, normally one default route per
	// family through its gateway.
	Routes []LinkRoute `json:"routes,omitempty"`
	// Gateways are the link-local gateways (169.254.1.1, fe80::1) the
	// routes point at; each resolves to GatewayMAC.
	Gateways []netip.Addr `json:"gateways,omitempty"`
	// TxGSO says the agent takes TCP super-packets flagged in the TX
	// descriptor's meta word (tso.go): a client may send them
	// (Options.TxGSO), or plain frames only.
	TxGSO bool `json:"txGSO,omitempty"`
	// RxGSO says the agent sends TCP packets with partial checksums,
	// flagged in the RX completion's meta word, to a client that accepts
	// them on the peer socket (tso.go; Options.RxGSO).
	RxGSO bool `json:"rxGSO,omitempty"`
}

// LinkRoute is one route of a LinkConfig.
type LinkRoute struct {
	Dst netip.Prefix `json:"dst"`
	// GW is the next hop; the zero Addr means the destination is on link.
	GW netip.Addr `json:"gw,omitzero"`
}

// ErrDialRefused wraps the agent's refusal (LinkConfig.Error).
var ErrDialRefused = errors.New("agent refused the link")

// ParseLinkConfig decodes and validates one link config record. A record
// carrying Error yields an error wrapping ErrDialRefused. Unknown fields are
// ignored, so that a newer agent may add some.
func ParseLinkConfig(b []byte) (LinkConfig, error) {
	if len(b) > MaxLinkConfigSize {
		return LinkConfig{}, fmt.Errorf("link config: %d bytes, more than %d", len(b), MaxLinkConfigSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	var c LinkConfig
	if err := dec.Decode(&c); err != nil {
		return LinkConfig{}, fmt.Errorf("link config: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return LinkConfig{}, fmt.Errorf("link config: data after the JSON object at offset %d", dec.InputOffset())
	}
	if c.Version != LinkConfigVersion {
		return LinkConfig{}, fmt.Errorf("link config: version %d, this side speaks %d", c.Version, LinkConfigVersion)
	}
	if c.Error != "" {
		return LinkConfig{}, fmt.Errorf("%w: %q", ErrDialRefused, c.Error)
	}
	if err := c.Validate(); err != nil {
		return LinkConfig{}, err
	}
	return c, nil
}

// Validate reports every problem of a link config (one that carries no
// Error) at once.
func (c *LinkConfig) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Version != LinkConfigVersion {
		add("version: %d, want %d", c.Version, LinkConfigVersion)
	}
	if err := checkUnicastMAC(c.MAC); err != nil {
		add("mac: %w", err)
	}
	if err := checkUnicastMAC(c.GatewayMAC); err != nil {
		add("gatewayMac: %w", err)
	}
	if err := linkspec.CheckMTU(int(c.MTU), linkspec.MinMTU); err != nil {
		add("mtu: %w", err)
	}
	if c.BufferSize < queue.MinBufferSize || c.BufferSize > queue.MaxBufferSize {
		add("bufferSize: %d outside [%d, %d]", c.BufferSize, queue.MinBufferSize, queue.MaxBufferSize)
	}
	if len(c.Addresses) == 0 {
		add("addresses: none")
	}
	for i, p := range c.Addresses {
		if !p.IsValid() || p.Addr().Zone() != "" || p.Addr().Is4In6() {
			add("addresses[%d]: %s is not a plain IPv4 or IPv6 prefix", i, p)
		}
	}
	for i, gw := range c.Gateways {
		if !gw.IsValid() || gw.Zone() != "" || gw.Is4In6() {
			add("gateways[%d]: %s is not a plain IPv4 or IPv6 address", i, gw)
		}
	}
	for i, r := range c.Routes {
		if !r.Dst.IsValid() || r.Dst != r.Dst.Masked() {
			add("routes[%d].dst: %s is not a masked prefix", i, r.Dst)
			continue
		}
		if r.GW.IsValid() && r.GW.Is4() != r.Dst.Addr().Is4() {
			add("routes[%d].gw: %s is not of the family of %s", i, r.GW, r.Dst)
		}
	}
	return errors.Join(errs...)
}

// checkUnicastMAC accepts a 6-byte unicast MAC address, not all zeroes.
func checkUnicastMAC(s string) error {
	hw, err := net.ParseMAC(s)
	switch {
	case err != nil || len(hw) != header.EthernetAddressSize:
		return fmt.Errorf("%q is not a 6-byte MAC address", s)
	case hw[0]&1 != 0:
		return fmt.Errorf("%s is a multicast address", s)
	case bytes.Equal(hw, make([]byte, header.EthernetAddressSize)):
		return fmt.Errorf("%s is all zeroes", s)
	}
	return nil
}
