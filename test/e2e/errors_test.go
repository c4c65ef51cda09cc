package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// TestBadConfigsAndEnvironments runs ADD through libcni and the real agent
// with broken conflists and broken CNI environments: each fails with its
// CNI error code and leaves nothing behind, neither in the pod netns nor
// in the agent.
func TestBadConfigsAndEnvironments(t *testing.T) {
	n := newNode(t, node.Options{})
	ctx := testContext(t)
	notNetns := filepath.Join(t.TempDir(), "not-a-netns")
	if err := os.WriteFile(notNetns, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// plugin edits the shm-cni plugin entry; conflist the whole
		// conflist.
		plugin   func(map[string]any)
		conflist func(map[string]any)
		// rt edits the runtime config of a fresh pod netns.
		rt   func(*libcni.RuntimeConf)
		want uint
	}{
		{name: "unknown kind", plugin: func(p map[string]any) { p["kind"] = "vhost" }, want: codeInvalidConfig},
		{name: "mtu too small", plugin: func(p map[string]any) { p["mtu"] = 10 }, want: codeInvalidConfig},
		{name: "mtu not a number", plugin: func(p map[string]any) { p["mtu"] = "1500" }, want: codeInvalidConfig},
		{name: "relative agentSocket", plugin: func(p map[string]any) { p["agentSocket"] = "agent.sock" }, want: codeInvalidConfig},
		{name: "unknown queue key", plugin: func(p map[string]any) { p["queue"] = map[string]any{"ringSize": 4096} }, want: codeUnsupportedField},
		{name: "bad queue bufferSize", plugin: func(p map[string]any) { p["kind"] = "shm"; p["queue"] = map[string]any{"bufferSize": 100} }, want: codeInvalidConfig},
		{name: "ipam without type", plugin: func(p map[string]any) { p["ipam"] = map[string]any{"subnet": "10.1.0.0/16"} }, want: codeInvalidConfig},
		{name: "bad logLevel", plugin: func(p map[string]any) { p["logLevel"] = "loud" }, want: codeInvalidConfig},
		{name: "no agent at agentSocket", plugin: func(p map[string]any) { p["agentSocket"] = filepath.Join(n.Dir, "nobody.sock") }, want: codeTryAgainLater},
		{name: "no agent at agentSocket (shm)", plugin: func(p map[string]any) {
			p["kind"] = "shm"
			p["agentSocket"] = filepath.Join(n.Dir, "nobody.sock")
		}, want: codeTryAgainLater},
		{name: "cniVersion too old", conflist: func(c map[string]any) { c["cniVersion"] = "0.4.0" }, want: codeIncompatibleVersion},
		{name: "unknown CNI_ARGS key", rt: func(rt *libcni.RuntimeConf) { rt.Args = [][2]string{{"SHM_CNI_COLOR", "blue"}} }, want: codeInvalidEnvironment},
		{name: "unknown SHM_CNI_KIND", rt: func(rt *libcni.RuntimeConf) { rt.Args = append(rt.Args, [2]string{"SHM_CNI_KIND", "vhost"}) }, want: codeInvalidConfig},
		{name: "CNI_NETNS missing", rt: func(rt *libcni.RuntimeConf) { rt.NetNS = filepath.Join(n.Dir, "no-such-netns") }, want: codeInvalidEnvironment},
		{name: "CNI_NETNS not a netns", rt: func(rt *libcni.RuntimeConf) { rt.NetNS = notNetns }, want: codeInvalidEnvironment},
		{name: "CNI_NETNS is the plugin's own", rt: func(rt *libcni.RuntimeConf) { rt.NetNS = n.Host.Path() }, want: codeInvalidNetNS},
		{name: "CNI_IFNAME exists (tap)", rt: func(rt *libcni.RuntimeConf) { rt.IfName = "lo" }, want: codeInterfaceExists},
		{name: "CNI_IFNAME exists (shm)", rt: func(rt *libcni.RuntimeConf) {
			rt.IfName = "lo"
			rt.Args = append(rt.Args, [2]string{"SHM_CNI_KIND", "shm"})
		}, want: codeInterfaceExists},
		{name: "CNI_IFNAME exists (veth)", rt: func(rt *libcni.RuntimeConf) {
			rt.IfName = "lo"
			rt.Args = append(rt.Args, [2]string{"SHM_CNI_KIND", "veth"})
		}, want: codeInterfaceExists},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plugin := maps.Clone(n.PluginConfig())
			if tc.plugin != nil {
				tc.plugin(plugin)
			}
			list := map[string]any{"cniVersion": "1.1.0", "name": node.NetworkName, "plugins": []any{plugin}}
			if tc.conflist != nil {
				tc.conflist(list)
			}
			b, err := json.Marshal(list)
			if err != nil {
				t.Fatal(err)
			}
			l, err := libcni.NetworkConfFromBytes(b)
			if err != nil {
				t.Fatal(err)
			}
			x, err := n.NewPodNetNS()
			if err != nil {
				t.Fatal(err)
			}
			rt := node.RuntimeConf("bad", "e2e-bad", x.Path(), "")
			if tc.rt != nil {
				tc.rt(rt)
			}
			_, err = n.CNIAdd(ctx, n.CNI(t.TempDir()), l, rt)
			wantCode(t, "ADD", err, tc.want)
			t.Logf("ADD: %v", err)
			wantLinks(t, x, "lo")
			wantNoAttachments(t, ctx, n)
			if err := node.DeleteNetNS(x); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestAgentRefusals are ADDs the configuration allows but the agent
// refuses: an attachment that exists (code 101) and an exhausted pod CIDR
// (code 103). Each failed ADD is undone in its pod netns, and the pods
// already there keep working.
func TestAgentRefusals(t *testing.T) {
	const (
		codeAttachFailed     = 101
		codeAddressExhausted = 103
	)
	// A /29 leaves 5 pod addresses (network, node gateway and broadcast
	// are not handed out); the IPv6 /125 has 6.
	n := newNode(t, node.Options{PodCIDRs: []netip.Prefix{
		netip.MustParsePrefix("10.244.7.0/29"), netip.MustParsePrefix("fd00:10:244:7::/125"),
	}})
	ctx := testContext(t)
	l := networkList(t, n)
	var pods []*node.Pod
	var ids []string
	for i := range 5 {
		kind := node.KindTap
		if i%2 == 1 {
			kind = node.KindShm
		}
		pods = append(pods, addPod(t, ctx, n, fmt.Sprintf("p%d", i), kind))
		ids = append(ids, pods[i].RT.ContainerID)
	}
	first := ids[0]

	for _, tc := range []struct {
		name        string
		containerID string
		kind        string
		want        uint
	}{
		{"attachment exists (tap)", first, node.KindTap, codeAttachFailed},
		{"attachment exists (shm)", first, node.KindShm, codeAttachFailed},
		{"pod CIDR exhausted (tap)", "e2e-more", node.KindTap, codeAddressExhausted},
		{"pod CIDR exhausted (shm)", "e2e-more", node.KindShm, codeAddressExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, err := n.NewPodNetNS()
			if err != nil {
				t.Fatal(err)
			}
			_, err = n.CNIAdd(ctx, n.CNI(t.TempDir()), l, node.RuntimeConf("more", tc.containerID, x.Path(), tc.kind))
			wantCode(t, "ADD", err, tc.want)
			t.Logf("ADD: %v", err)
			wantLinks(t, x, "lo")
			wantAttachments(t, ctx, n, ids...)
		})
	}
	for _, p := range pods[:2] {
		if err := n.CNICheck(ctx, n.CNI(""), l, p.RT); err != nil {
			t.Errorf("CHECK of %s after the refusals: %v", p.Name, err)
		}
		if _, err := n.Transfer(ctx, n.HostPeer(), n.PodPeer(p), false, 1<<20); err != nil {
			t.Errorf("traffic to %s after the refusals: %v", p.Name, err)
		}
	}
}
