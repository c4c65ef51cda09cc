package cni

import (
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/shm-cni/shm-cni/internal/testutil"
	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// TestCreateOverExisting checks that the creation of each kind of pod
// interface is what refuses an existing CNI_IFNAME (no lookup before it),
// with agentapi.CodeInterfaceExists naming CNI_IFNAME, and leaves that
// interface alone.
func TestCreateOverExisting(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		kind   string
		create func(ns.NetNS) error
	}{
		{KindTap, func(netns ns.NetNS) error {
			f, _, err := createTAP(netns, "eth0", 0)
			if f != nil {
				f.Close()
			}
			return err
		}},
		{KindShm, func(netns ns.NetNS) error {
			_, err := createPlaceholder(netns, "eth0", nil, 1500, "/run/shm-cni/test.sock")
			return err
		}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			netns := testutil.NewNS(t)
			if err := netns.Do(func(ns.NetNS) error {
				return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1234}})
			}); err != nil {
				t.Fatal(err)
			}
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
