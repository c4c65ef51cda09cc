package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
)

// FuzzPodKind feeds arbitrary CNI_ARGS and per-pod kind sources (the
// config's kind, args.cni.kind, the pod annotation shm-cni.io/kind in
// runtimeConfig) to ParsePodArgs and Config.PodKind. It must never panic;
// CNI_ARGS errors are agentapi.CodeInvalidEnvironment; the kind chosen is the first
// source that is set, in the documented order, and an unknown value there is
// agentapi.CodeInvalidConfig naming that source.
func FuzzPodKind(f *testing.F) {
	f.Add("", "", "", "", false, false)
	f.Add("IgnoreUnknown=1;K8S_POD_NAME=p;SHM_CNI_KIND=shm", "", "", "", false, false)
	f.Add("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;SHM_CNI_KIND=shm", "tap", "", "", false, false)
	f.Add("SHM_CNI_KIND=tap", "shm", "shm", "shm", true, true)
	f.Add("", "", "tap", "shm", true, true)
	f.Add("", "", "", "shm", false, true)
	f.Add("SHM_CNI_KIND=vhost", "", "", "", false, false)
	f.Add("", "", "vhost", "", true, false)
	f.Add("", "", "", "vhost", false, true)
	f.Add("FOO=bar", "", "", "", false, false)
	f.Add("SHM_CNI_KIND", "", "", "", false, false)
	f.Add("SHM_CNI_KIND=shm;SHM_CNI_KIND=tap", "", "", "", false, false)
	f.Add("IgnoreUnknown=true;a=b=c", "", "", "", false, false)
	f.Add(";;", "", "", "", false, false)
	f.Fuzz(func(t *testing.T, cniArgs, confKind, argsKind, annotation string, hasArgs, hasAnnotations bool) {
		m := map[string]any{"cniVersion": "1.1.0", "name": "pods", "type": "shm-cni"}
		if confKind != "" {
			m["kind"] = confKind
		}
		if hasArgs {
			m["args"] = map[string]any{"cni": map[string]any{"kind": argsKind}}
		}
		if hasAnnotations {
			m["runtimeConfig"] = map[string]any{PodAnnotationsKey: map[string]string{AnnotationKind: annotation, "other": "x"}}
		}
		data, err := json.Marshal(m)
		if err != nil {
			t.Skip("not representable as JSON")
		}
		c, err := ParseConfig(data)
		if err != nil {
			if codeOf(err) != agentapi.CodeInvalidConfig || !strings.Contains(err.Error(), "kind") {
				t.Fatalf("config kind %q: code %d: %v", confKind, codeOf(err), err)
			}
			return
		}
		a, err := ParsePodArgs(cniArgs)
		if err != nil {
			if got := codeOf(err); got != agentapi.CodeInvalidEnvironment || !strings.Contains(err.Error(), "CNI_ARGS") {
				t.Fatalf("CNI_ARGS %q: code %d, want %d naming CNI_ARGS: %v", cniArgs, got, agentapi.CodeInvalidEnvironment, err)
			}
			return
		}
		// A CNI_ARGS with exactly one SHM_CNI_KIND pair yields its value.
		var vals []string
		for pair := range strings.SplitSeq(cniArgs, ";") {
			if v, ok := strings.CutPrefix(pair, ArgKind+"="); ok {
				vals = append(vals, v)
			}
		}
		if len(vals) == 1 && string(a.SHM_CNI_KIND) != vals[0] {
			t.Fatalf("CNI_ARGS %q: %s = %q, want %q", cniArgs, ArgKind, a.SHM_CNI_KIND, vals[0])
		}

		type source struct{ name, value string }
		srcs := []source{{ArgKind, string(a.SHM_CNI_KIND)}}
		if hasArgs {
			srcs = append(srcs, source{"args.cni.kind", argsKind})
		}
		if hasAnnotations {
			srcs = append(srcs, source{AnnotationKind, annotation})
		}
		srcs = append(srcs, source{"kind", c.Kind})
		want := source{"default", DefaultKind}
		for _, s := range srcs {
			if s.value != "" {
				want = s
				break
			}
		}
		kind, err := c.PodKind(a)
		if want.value != KindTap && want.value != KindShm {
			if err == nil || codeOf(err) != agentapi.CodeInvalidConfig || !strings.Contains(err.Error(), want.name) {
				t.Fatalf("kind %q from %s: got %q, %v; want code %d naming %s", want.value, want.name, kind, err, agentapi.CodeInvalidConfig, want.name)
			}
			return
		}
		if err != nil || kind != want.value {
			t.Fatalf("got kind %q, %v; want %q from %s", kind, err, want.value, want.name)
		}
	})
}

// FuzzPrevResult feeds arbitrary configs, prevResult and
// cni.dev/valid-attachments included, through what ADD, CHECK and GC do with
// them before touching a namespace or the agent: ParseConfig, GC's request,
// version.ParsePrevResult, the conversion to a 1.x result, CHECK's reading
// of the pod's interface (expectedLink) and ADD's result (buildResult,
// printed in the config's version). It must never panic; every error is a
// *types.Error with a code the plugin documents; for a supported cniVersion
// ADD's result always prints.
func FuzzPrevResult(f *testing.F) {
	for _, tc := range configCases {
		f.Add([]byte(tc.conf))
	}
	prev := `{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:f4:00:02","mtu":1500,"sandbox":"/var/run/netns/p"}],` +
		`"ips":[{"interface":0,"address":"10.244.0.2/32","gateway":"169.254.1.1"},{"interface":0,"address":"fd00::2/128","gateway":"fe80::1"}],` +
		`"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"},{"dst":"::/0","gw":"fe80::1"}]}`
	for _, v := range []string{"1.1.0", "1.0.0", "0.4.0", "0.3.1", "", "9.9.9"} {
		f.Add([]byte(`{"cniVersion":"` + v + `","name":"pods","type":"shm-cni","prevResult":` + prev + `}`))
	}
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","interface":-1,"address":"10.1.0.2/24"}]}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"1.1.0","ips":[{"interface":7,"address":"10.1.0.2/24"}]}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"1.1.0","interfaces":[null],"ips":[null],"routes":[null]}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p"}],"ips":[null]}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p"}],"ips":[{"interface":0,"address":"10.1.0.2/24"}],"routes":[null]}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"0.1.0","ip4":{"ip":"10.1.0.2/24"}}}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":[]}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"},{"containerID":"../x","ifname":""}]}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"pods","prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p","mac":"zz"}],"ips":[{"interface":0,"address":"10.1.0.2/24"}]}}`))

	supported := VersionInfo().SupportedVersions()
	at := &attachment{
		Addrs:  []netip.Prefix{netip.MustParsePrefix("10.244.0.9/32"), netip.MustParsePrefix("fd00::9/128")},
		Gws:    []netip.Addr{DefaultGatewayV4, DefaultGatewayV6},
		Routes: []podRoute{{Dst: netip.MustParsePrefix("0.0.0.0/0"), GW: DefaultGatewayV4}},
		MTU:    1500,
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		wantCodes := func(what string, err error, codes ...uint) {
			t.Helper()
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("%s: error %v is a %T, not a *types.Error", what, err, err)
			}
			if !slices.Contains(codes, te.Code) {
				t.Fatalf("%s: code %d, want one of %v: %v", what, te.Code, codes, err)
			}
		}
		conf, err := ParseConfig(data)
		if err != nil {
			wantCodes("ParseConfig", err, agentapi.CodeDecodingFailure, agentapi.CodeInvalidConfig, agentapi.CodeUnsupportedField)
			return
		}
		// GC: the valid attachments become the agent's request, which
		// agentapi.Call validates before sending.
		valid := make([]agentapi.Attachment, 0, len(conf.ValidAttachments))
		for _, a := range conf.ValidAttachments {
			valid = append(valid, agentapi.Attachment{ContainerID: a.ContainerID, IfName: a.IfName})
		}
		gc := &agentapi.Request{Version: agentapi.Version, Op: agentapi.OpGC, GC: &agentapi.GCRequest{Valid: valid}}
		if err := gc.Validate(); err != nil && (codeOf(err) != agentapi.CodeInvalidConfig || !strings.Contains(err.Error(), "gc.valid[")) {
			t.Fatalf("GC request: code %d, want %d naming gc.valid: %v", codeOf(err), agentapi.CodeInvalidConfig, err)
		}
		// ADD and CHECK map this error to agentapi.CodeDecodingFailure.
		if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
			return
		}
		var prevRes *types100.Result
		if conf.PrevResult != nil {
			r, err := types100.NewResultFromResult(conf.PrevResult)
			if err != nil {
				return // CHECK: agentapi.CodeDecodingFailure
			}
			prevRes = r
			if _, err := expectedLink(r, "eth0", "/var/run/netns/p"); err != nil {
				wantCodes("expectedLink", err, agentapi.CodeCheckFailed, agentapi.CodeDecodingFailure)
			}
			if addrs, err := ipamAddresses(conf.PrevResult); err == nil && len(addrs) != len(r.IPs) {
				t.Fatalf("ipam addresses %v of %d IPs", addrs, len(r.IPs))
			}
		}
		n := 0
		if prevRes != nil {
			n = len(prevRes.Interfaces)
		}
		iface := &types100.Interface{Name: "eth0", Sandbox: "/var/run/netns/p", Mtu: 1500, Mac: "0a:58:0a:f4:00:09"}
		res, err := buildResult(conf.CNIVersion, conf.PrevResult, iface, at)
		if err != nil {
			wantCodes("buildResult", err, agentapi.CodeDecodingFailure)
			return
		}
		if len(res.Interfaces) != n+1 || res.Interfaces[n] != iface {
			t.Fatalf("result interfaces %v, want the previous %d and ours", res.Interfaces, n)
		}
		if !slices.Contains(supported, conf.CNIVersion) {
			return // skel refuses the config before ADD runs
		}
		out, err := res.GetAsVersion(conf.CNIVersion)
		if err != nil {
			t.Fatalf("result as %s: %v", conf.CNIVersion, err)
		}
		var buf bytes.Buffer
		if err := out.PrintTo(&buf); err != nil {
			t.Fatalf("print result: %v", err)
		}
		if _, err := version.NewResult(conf.CNIVersion, buf.Bytes()); err != nil {
			t.Fatalf("printed result %s does not parse back: %v", buf.Bytes(), err)
		}
	})
}

// FuzzAgentAnswer feeds arbitrary attach answers through what the CNI
// binary does with them: agentapi.DecodeResponse, parseAttach, the pod
// link's configuration and the result. It must never panic; a refused
// answer is agentapi.CodeBadAgentAnswer (or the decoder's codes); an accepted one
// gives the pod host addresses, a gateway of the right family for each,
// routes, an MTU in range, a shm link an absolute attach socket path that
// fits sun_path, and a result that prints.
func FuzzAgentAnswer(f *testing.F) {
	seeds := []string{
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32","gateway":"169.254.1.1"},{"address":"fd00:10:244::2/128","gateway":"fe80::1"}],"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"},{"dst":"::/0","gw":"fe80::1"}],"mtu":1500,"mac":"0a:58:0a:f4:00:02","gatewayMAC":"ee:ee:ee:ee:ee:ee","socketPath":"/run/x.sock"}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/24"}],"mtu":0}}`,
		`{"version":1,"attach":{"ips":[]}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32"},{"address":"10.244.0.2/32"}]}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32","gateway":"fe80::1"}]}}`,
		`{"version":1,"attach":{"ips":[{"address":"fe80::2/64"}]}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32"}],"routes":[{"dst":"10.0.0.0/8","gw":"fe80::1%eth0","mtu":-1}]}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32"}],"mtu":70000}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32"}],"mac":"01:00:5e:00:00:01"}}`,
		`{"version":1,"attach":{"ips":[{"address":"::ffff:10.244.0.2/128"}]}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32"}],"socketPath":"x.sock"}}`,
		`{"version":1,"attach":{"ips":[{"address":"10.244.0.2/32"}],"socketPath":"/` + strings.Repeat("s", 107) + `"}}`,
		`{"version":1,"error":{"code":103,"msg":"no address"}}`,
		`{"version":1}`,
	}
	for i, s := range seeds {
		f.Add([]byte(s), i%2 == 0, uint16(1500))
	}
	f.Fuzz(func(t *testing.T, data []byte, tap bool, confMTU uint16) {
		kind := KindShm
		if tap {
			kind = KindTap
		}
		mtu := int(confMTU)
		if mtu < 68 {
			mtu = DefaultMTU // Config.Validate refuses it
		}
		resp, err := agentapi.DecodeResponse(data, agentapi.OpAttach)
		if err != nil {
			if c := codeOf(err); c != agentapi.CodeDecodingFailure && c != agentapi.CodeVersionMismatch {
				t.Fatalf("decode: code %d: %v", c, err)
			}
			return
		}
		if resp.Error != nil {
			return
		}
		at, err := parseAttach(resp.Attach, kind, mtu)
		if err != nil {
			if c := codeOf(err); c != agentapi.CodeBadAgentAnswer {
				t.Fatalf("parseAttach: code %d: %v", c, err)
			}
			return
		}
		if len(at.Addrs) == 0 || len(at.Addrs) != len(at.Gws) {
			t.Fatalf("%d addresses, %d gateways", len(at.Addrs), len(at.Gws))
		}
		for i, a := range at.Addrs {
			if a.Bits() != a.Addr().BitLen() || !a.Addr().IsGlobalUnicast() {
				t.Fatalf("address %s is not a unicast host prefix", a)
			}
			if at.Gws[i].Is4() != a.Addr().Is4() {
				t.Fatalf("gateway %s for %s", at.Gws[i], a)
			}
		}
		if at.MTU < 68 || at.MTU > 65535 {
			t.Fatalf("mtu %d", at.MTU)
		}
		if len(at.Routes) == 0 {
			t.Fatal("no routes")
		}
		for _, r := range at.Routes {
			if r.GW.IsValid() && r.GW.Is4() != r.Dst.Addr().Is4() {
				t.Fatalf("route %s via %s", r.Dst, r.GW)
			}
		}
		if !tap && (!filepath.IsAbs(at.SocketPath) || len(at.SocketPath) > maxSocketPath) {
			t.Fatalf("shm link with attach socket %q", at.SocketPath)
		}
		if tap && at.MAC != nil {
			t.Fatalf("tap link with a pod MAC %s from the agent", at.MAC)
		}
		lc := at.linkConfig()
		if lc.MTU != at.MTU || len(lc.Addrs) != len(at.Addrs) {
			t.Fatalf("link config %+v of %+v", lc, at)
		}
		iface := &types100.Interface{Name: "eth0", Sandbox: "/var/run/netns/p", Mtu: at.MTU}
		res, err := buildResult("1.1.0", nil, iface, at)
		if err != nil {
			t.Fatalf("buildResult: %v", err)
		}
		var buf bytes.Buffer
		if err := res.PrintTo(&buf); err != nil {
			t.Fatalf("print result: %v", err)
		}
		back, err := types100.NewResult(buf.Bytes())
		if err != nil {
			t.Fatalf("printed result %s does not parse back: %v", buf.Bytes(), err)
		}
		if got := len(back.(*types100.Result).IPs); got != len(at.Addrs) {
			t.Fatalf("printed result has %d IPs, want %d", got, len(at.Addrs))
		}
	})
}
