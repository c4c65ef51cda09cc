package cni

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// TestCreateOverExisting checks that the creation of each kind of pod
// interface is what refuses an existing CNI_IFNAME, with
// agentapi.CodeInterfaceExists naming CNI_IFNAME, and leaves that
// interface alone: for a TAP device nothing looks before, for a
// placeholder the name is taken after openPodIface found it free.
func TestCreateOverExisting(t *testing.T) {
	testutil.RequireRoot(t)
	addBridge := func(netns ns.NetNS) error {
		return netns.Do(func(ns.NetNS) error {
			return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1234}})
		})
	}
	for _, tc := range []struct {
		kind   string
		create func(ns.NetNS) error
	}{
		{KindTap, func(netns ns.NetNS) error {
			if err := addBridge(netns); err != nil {
				t.Fatal(err)
			}
			f, pod, err := createTAP(netns, "eth0", 0)
			if err == nil {
				f.Close()
				pod.Close()
			}
			return err
		}},
		{KindShm, func(netns ns.NetNS) error {
			pod, err := openPodIface(netns, "eth0")
			if err != nil {
				t.Fatal(err)
			}
			defer pod.Close()
			if err := addBridge(netns); err != nil {
				t.Fatal(err)
			}
			return pod.createPlaceholder(netns, nil, 1500, "/run/shm-cni/test.sock")
		}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			netns := testutil.NewNS(t)
			err := tc.create(netns)
			if got, want := codeOf(err), agentapi.CodeInterfaceExists; got != want || !strings.Contains(err.Error(), "CNI_IFNAME") {
				t.Errorf("create over an existing eth0 = %v (code %d), want code %d naming CNI_IFNAME", err, got, want)
			}
			if pl, ok := readPodLink(t, netns, "eth0"); !ok || pl.Type != "bridge" || pl.MTU != 1234 {
				t.Errorf("existing eth0 changed: %+v %t", pl, ok)
			}
			if names := linkNames(t, netns); len(names) != 2 {
				t.Errorf("interfaces after the refused create: %v, want lo and eth0", names)
			}
		})
	}
}

// TestPodIfaceOutsideNetns checks that a podIface configures its
// interface from a thread in another netns (the plugin's own), through
// the handle made inside the pod's: the address lands in the pod's netns,
// none in the caller's.
func TestPodIfaceOutsideNetns(t *testing.T) {
	testutil.RequireRoot(t)
	netns := testutil.NewNS(t)
	f, pod, err := createTAP(netns, "eth0", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	defer pod.Close()
	lc := linkConfig{MTU: 1400, Addrs: []netip.Prefix{netip.MustParsePrefix("10.99.0.2/32")}}
	if err := pod.configure(lc); err != nil {
		t.Fatal(err)
	}
	pl, ok := readPodLink(t, netns, "eth0")
	if !ok || pl.MTU != 1400 || !pl.Up || !slices.Equal(pl.Addrs, []string{"10.99.0.2/32"}) {
		t.Errorf("pod's eth0 = %+v %t, want MTU 1400, up, 10.99.0.2/32", pl, ok)
	}
	own, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range own {
		if a.IP.Equal(net.IPv4(10, 99, 0, 2)) {
			t.Errorf("10.99.0.2 in the test's own netns, on link %d", a.LinkIndex)
		}
	}
}
