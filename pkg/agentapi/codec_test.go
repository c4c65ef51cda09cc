package agentapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func shmAttach() *AttachRequest {
	return &AttachRequest{
		ContainerID:  "0123456789abcdef",
		IfName:       "eth0",
		Netns:        "/var/run/netns/cni-1234",
		Network:      "shm-net",
		Kind:         KindShm,
		MTU:          1500,
		Queue:        &QueueSizes{DataSize: 1 << 20, PipeSize: 64 << 10, BufferSize: 2048},
		PodNamespace: "default",
		PodName:      "web-0",
	}
}

func tapAttach() *AttachRequest {
	return &AttachRequest{
		ContainerID: "fedcba9876543210",
		IfName:      "eth0",
		Netns:       "/proc/1234/ns/net",
		Network:     "shm-net",
		Kind:        KindTap,
		IPs:         []string{"10.244.1.7/24", "fd00:10:244:1::7/64"},
		MAC:         "0a:58:0a:f4:01:07",
	}
}

// validRequests is one valid request of every op and kind, Version set.
func validRequests() map[string]*Request {
	return map[string]*Request{
		"attach shm": {Version: Version, Op: OpAttach, Attach: shmAttach()},
		"attach tap": {Version: Version, Op: OpAttach, Attach: tapAttach()},
		"attach veth": {Version: Version, Op: OpAttach, Attach: func() *AttachRequest {
			a := tapAttach()
			a.Kind = KindVeth
			return a
		}()},
		"detach": {Version: Version, Op: OpDetach, Detach: &DetachRequest{ContainerID: "c1", IfName: "eth0"}},
		"check":  {Version: Version, Op: OpCheck, Check: &CheckRequest{ContainerID: "c1", IfName: "net1", IPs: []string{"10.0.0.5/32"}}},
		"status": {Version: Version, Op: OpStatus},
		"gc": {Version: Version, Op: OpGC, GC: &GCRequest{Valid: []Attachment{
			{ContainerID: "c1", IfName: "eth0"}, {ContainerID: "c2", IfName: "eth0"},
		}}},
		"gc all": {Version: Version, Op: OpGC, GC: &GCRequest{Valid: []Attachment{}}},
	}
}

// attachJSON is a shm attach request as JSON, changed by mod (on the
// decoded map of the request).
func attachJSON(mod func(req, attach map[string]any)) string {
	b, _ := json.Marshal(&Request{Version: Version, Op: OpAttach, Attach: shmAttach()})
	var m map[string]any
	json.Unmarshal(b, &m)
	mod(m, m["attach"].(map[string]any))
	b, _ = json.Marshal(m)
	return string(b)
}

type decodeCase struct {
	name string
	in   string
	code uint     // 0: decodes
	sub  []string // substrings of the error
}

// decodeCases is the table of DecodeRequest, also the fuzz seed corpus.
func decodeCases() []decodeCase {
	set := func(k string, v any) func(_, a map[string]any) {
		return func(_, a map[string]any) { a[k] = v }
	}
	queue := func(k string, v any) func(_, a map[string]any) {
		return func(_, a map[string]any) { a["queue"].(map[string]any)[k] = v }
	}
	cases := []decodeCase{
		{name: "status", in: `{"version":1,"op":"status"}`},
		{name: "status with whitespace", in: " \n{ \"version\" : 1 , \"op\" : \"status\" }\n\t"},
		{name: "gc with empty list", in: `{"version":1,"op":"gc","gc":{"valid":[]}}`},
		{name: "attach with null optional", in: attachJSON(set("ips", nil))},
		{name: "attach with bandwidth", in: attachJSON(set("bandwidth", map[string]any{"ingressRate": 1e6, "ingressBurst": 1e6}))},

		{name: "empty", in: ``, code: CodeDecodingFailure},
		{name: "garbage", in: `not json at all`, code: CodeDecodingFailure, sub: []string{"cannot decode request"}},
		{name: "array", in: `[1,2,3]`, code: CodeDecodingFailure},
		{name: "truncated object", in: `{"version":1,"op":"sta`, code: CodeDecodingFailure},
		{name: "version as string", in: `{"version":"1","op":"status"}`, code: CodeDecodingFailure},
		{name: "op as number", in: `{"version":1,"op":5}`, code: CodeDecodingFailure},
		{name: "negative size", in: attachJSON(queue("dataSize", -1)), code: CodeDecodingFailure},
		{name: "second object", in: `{"version":1,"op":"status"} {}`, code: CodeDecodingFailure, sub: []string{"after top-level value"}},
		{name: "trailing garbage", in: `{"version":1,"op":"status"}x`, code: CodeDecodingFailure},
		{name: "too large", in: `{"version":1,"op":"status"}` + strings.Repeat(" ", MaxMessageSize), code: CodeDecodingFailure, sub: []string{"more than the limit of 65536"}},

		{name: "no version", in: `{"op":"status"}`, code: CodeVersionMismatch, sub: []string{"version 0", "version 1"}},
		{name: "version 2", in: `{"version":2,"op":"status"}`, code: CodeVersionMismatch, sub: []string{"version 2", "version 1"}},
		{name: "version 2 with new fields", in: `{"version":2,"op":"teleport","beam":{"up":true}}`, code: CodeVersionMismatch, sub: []string{"version 2"}},
		{name: "null", in: `null`, code: CodeVersionMismatch},

		{name: "unknown top field", in: `{"version":1,"op":"status","extra":true}`, code: CodeUnsupportedField, sub: []string{`"extra"`}},
		{name: "unknown attach field", in: attachJSON(set("vlan", 5)), code: CodeUnsupportedField, sub: []string{`"vlan"`}},
		{name: "unknown queue field", in: attachJSON(queue("rings", 2)), code: CodeUnsupportedField, sub: []string{`"rings"`}},

		{name: "no op", in: `{"version":1}`, code: CodeInvalidConfig, sub: []string{"op: required"}},
		{name: "unknown op", in: `{"version":1,"op":"xyz"}`, code: CodeInvalidConfig, sub: []string{`op: "xyz" is not one of attach, detach, check, status, gc`}},
		{name: "attach without body", in: `{"version":1,"op":"attach"}`, code: CodeInvalidConfig, sub: []string{`attach: required for op "attach"`}},
		{name: "status with attach body", in: attachJSON(func(r, _ map[string]any) { r["op"] = "status" }), code: CodeInvalidConfig, sub: []string{`attach: not allowed for op "status"`}},
		{name: "detach with extra gc body", in: `{"version":1,"op":"detach","detach":{"containerID":"c","ifName":"eth0"},"gc":{"valid":[]}}`, code: CodeInvalidConfig, sub: []string{`gc: not allowed for op "detach"`}},
		{name: "no container id", in: attachJSON(set("containerID", "")), code: CodeInvalidConfig, sub: []string{"attach.containerID: required"}},
		{name: "bad container id", in: attachJSON(set("containerID", "../etc")), code: CodeInvalidConfig, sub: []string{`attach.containerID: "../etc" must match`}},
		{name: "ifname with slash", in: attachJSON(set("ifName", "eth/0")), code: CodeInvalidConfig, sub: []string{`attach.ifName: "eth/0" must be 1..15 bytes, no '/', ':' or whitespace`}},
		{name: "ifname empty", in: attachJSON(set("ifName", "")), code: CodeInvalidConfig, sub: []string{"attach.ifName"}},
		{name: "ifname 16 bytes", in: attachJSON(set("ifName", "abcdefghijklmnop")), code: CodeInvalidConfig, sub: []string{"attach.ifName"}},
		{name: "ifname dot", in: attachJSON(set("ifName", ".")), code: CodeInvalidConfig, sub: []string{"attach.ifName"}},
		{name: "ifname space", in: attachJSON(set("ifName", "eth 0")), code: CodeInvalidConfig, sub: []string{"attach.ifName"}},
		{name: "ifname colon", in: attachJSON(set("ifName", "eth0:1")), code: CodeInvalidConfig, sub: []string{"attach.ifName"}},
		{name: "no netns", in: attachJSON(set("netns", "")), code: CodeInvalidConfig, sub: []string{"attach.netns: required"}},
		{name: "relative netns", in: attachJSON(set("netns", "netns/x")), code: CodeInvalidConfig, sub: []string{"attach.netns: \"netns/x\" is not an absolute path"}},
		{name: "bad network", in: attachJSON(set("network", "my net")), code: CodeInvalidConfig, sub: []string{"attach.network"}},
		{name: "no kind", in: attachJSON(set("kind", "")), code: CodeInvalidConfig, sub: []string{"attach.kind: required"}},
		{name: "unknown kind", in: attachJSON(set("kind", "xyz")), code: CodeInvalidConfig, sub: []string{`attach.kind: "xyz" is not one of shm, tap, veth`}},
		{name: "shm without queue", in: attachJSON(set("queue", nil)), code: CodeInvalidConfig, sub: []string{"attach.queue: required for kind shm"}},
		{name: "zero data size", in: attachJSON(queue("dataSize", 0)), code: CodeInvalidConfig, sub: []string{"attach.queue.dataSize: required"}},
		{name: "zero pipe and buffer size", in: attachJSON(func(_, a map[string]any) {
			a["queue"] = map[string]any{"dataSize": 4096}
		}), code: CodeInvalidConfig, sub: []string{"attach.queue.pipeSize: required", "attach.queue.bufferSize: required"}},
		{name: "tap with queue", in: attachJSON(set("kind", "tap")), code: CodeInvalidConfig, sub: []string{"attach.queue: only for kind shm"}},
		{name: "tiny mtu", in: attachJSON(set("mtu", 10)), code: CodeInvalidConfig, sub: []string{"attach.mtu: 10"}},
		{name: "bad ip", in: attachJSON(set("ips", []string{"10.0.0.300/24"})), code: CodeInvalidConfig, sub: []string{`attach.ips[0]: "10.0.0.300/24" is not a CIDR`}},
		{name: "ip without prefix", in: attachJSON(set("ips", []string{"10.0.0.3"})), code: CodeInvalidConfig, sub: []string{"attach.ips[0]"}},
		{name: "duplicate ip", in: attachJSON(set("ips", []string{"10.0.0.3/24", "10.0.0.3/32"})), code: CodeInvalidConfig, sub: []string{"attach.ips[1]", "repeats", "attach.ips[0]"}},
		{name: "bad mac", in: attachJSON(set("mac", "zz:zz")), code: CodeInvalidConfig, sub: []string{"attach.mac"}},
		{name: "multicast mac", in: attachJSON(set("mac", "01:00:5e:00:00:01")), code: CodeInvalidConfig, sub: []string{"attach.mac", "multicast"}},
		{name: "bandwidth rate without burst", in: attachJSON(set("bandwidth", map[string]any{"ingressRate": 1e6})), code: CodeInvalidConfig,
			sub: []string{"attach.bandwidth.ingressBurst: required when ingressRate is set"}},
		{name: "bandwidth burst too large", in: attachJSON(set("bandwidth", map[string]any{"egressRate": 1e6, "egressBurst": 1e12})), code: CodeInvalidConfig,
			sub: []string{"attach.bandwidth.egressBurst: 1000000000000 bits is more than"}},
		{name: "negative bandwidth", in: attachJSON(set("bandwidth", map[string]any{"egressRate": -1})), code: CodeDecodingFailure},
		{name: "pod name with slash", in: attachJSON(set("podName", "a/b")), code: CodeInvalidConfig, sub: []string{"attach.podName"}},
		{name: "many problems", in: attachJSON(func(_, a map[string]any) {
			a["containerID"] = ""
			a["ifName"] = "x/y"
			a["kind"] = "vhost"
		}), code: CodeInvalidConfig, sub: []string{"attach.containerID", "attach.ifName", "attach.kind"}},
		{name: "detach bad ifname", in: `{"version":1,"op":"detach","detach":{"containerID":"c","ifName":""}}`, code: CodeInvalidConfig, sub: []string{"detach.ifName"}},
		{name: "check bad bandwidth", in: `{"version":1,"op":"check","check":{"containerID":"c","ifName":"eth0","bandwidth":{"egressBurst":8}}}`, code: CodeInvalidConfig, sub: []string{"check.bandwidth.egressRate: required"}},
		{name: "check bad ip", in: `{"version":1,"op":"check","check":{"containerID":"c","ifName":"eth0","ips":["nope"]}}`, code: CodeInvalidConfig, sub: []string{"check.ips[0]"}},
		{name: "gc bad entry", in: `{"version":1,"op":"gc","gc":{"valid":[{"containerID":"c","ifName":"eth0"},{"containerID":"","ifName":"eth0"}]}}`, code: CodeInvalidConfig, sub: []string{"gc.valid[1].containerID: required"}},
	}
	for name, req := range validRequests() {
		b, _ := json.Marshal(req)
		cases = append(cases, decodeCase{name: "valid " + name, in: string(b)})
	}
	return cases
}

// TestDecodeRequest checks each input decodes, or fails with the right code
// and a message naming the problem.
func TestDecodeRequest(t *testing.T) {
	for _, tc := range decodeCases() {
		t.Run(tc.name, func(t *testing.T) {
			req, err := DecodeRequest([]byte(tc.in))
			if got := codeOf(err); got != tc.code {
				t.Fatalf("code %d (%v), want %d", got, err, tc.code)
			}
			if tc.code == 0 {
				if req == nil || req.Version != Version {
					t.Fatalf("got %+v", req)
				}
				return
			}
			if req != nil {
				t.Errorf("got request %+v with error", req)
			}
			for _, s := range tc.sub {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
		})
	}
}

// TestDecodeRequestRoundTrip checks that every valid request survives
// encoding and decoding unchanged.
func TestDecodeRequestRoundTrip(t *testing.T) {
	for name, want := range validRequests() {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeRequest(mustJSON(t, want))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("got %+v, want %+v", got, want)
			}
		})
	}
}

// TestJSONKeys pins the wire names of the fields.
func TestJSONKeys(t *testing.T) {
	got := string(mustJSON(t, &Request{Version: 1, Op: OpAttach, Attach: tapAttach()}))
	want := `{"version":1,"op":"attach","attach":{"containerID":"fedcba9876543210","ifName":"eth0","netns":"/proc/1234/ns/net","network":"shm-net","kind":"tap","ips":["10.244.1.7/24","fd00:10:244:1::7/64"],"mac":"0a:58:0a:f4:01:07"}}`
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	got = string(mustJSON(t, &Response{Version: 1, Error: NewError(7, "m", "d"), Attach: &AttachResponse{
		IPs: []IPConfig{{Address: "10.0.0.2/32", Gateway: "169.254.1.1"}}, Routes: []Route{{Dst: "0.0.0.0/0", GW: "169.254.1.1", MTU: 1400}},
		MTU: 1500, MAC: "m1", GatewayMAC: "m2", SocketPath: "/run/x.sock",
	}, Status: &StatusResponse{Ready: true, Reason: "r", Attachments: 3}, GC: &GCResponse{Released: []Attachment{{ContainerID: "c", IfName: "eth0"}}}}))
	want = `{"version":1,"error":{"code":7,"msg":"m","details":"d"},"attach":{"ips":[{"address":"10.0.0.2/32","gateway":"169.254.1.1"}],"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1","mtu":1400}],"mtu":1500,"mac":"m1","gatewayMAC":"m2","socketPath":"/run/x.sock"},"status":{"ready":true,"reason":"r","attachments":3},"gc":{"released":[{"containerID":"c","ifName":"eth0"}]}}`
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

// TestValidateFDs checks the FD count each op and kind needs.
func TestValidateFDs(t *testing.T) {
	reqs := validRequests()
	tests := []struct {
		req  string
		n    int
		want string // "" for valid
	}{
		{"attach shm", 10, ""},
		{"attach shm", 0, `attach kind "shm" needs 10 file descriptors, got 0`},
		{"attach shm", 9, `attach kind "shm" needs 10 file descriptors, got 9`},
		{"attach shm", 11, `needs 10 file descriptors, got 11`},
		{"attach tap", 1, ""},
		{"attach tap", 2, `attach kind "tap" needs 1 file descriptors, got 2`},
		{"attach tap", 0, `got 0`},
		{"attach veth", 0, ""},
		{"attach veth", 1, `attach kind "veth" needs 0 file descriptors, got 1`},
		{"detach", 0, ""},
		{"detach", 1, `op "detach" needs 0 file descriptors, got 1`},
		{"status", 3, `op "status" needs 0`},
		{"gc", 0, ""},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s/%d", tc.req, tc.n), func(t *testing.T) {
			err := reqs[tc.req].ValidateFDs(tc.n)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if codeOf(err) != CodeInvalidConfig || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v (code %d), want code 7 with %q", err, codeOf(err), tc.want)
			}
		})
	}
}

// TestDecodeResponse checks the client-side checks of an answer.
func TestDecodeResponse(t *testing.T) {
	tests := []struct {
		name, op, in string
		code         uint
	}{
		{"status", OpStatus, `{"version":1,"status":{"ready":true,"attachments":2}}`, 0},
		{"detach empty success", OpDetach, `{"version":1}`, 0},
		{"unknown field ignored", OpDetach, `{"version":1,"newer":{"x":1}}`, 0},
		{"agent error", OpAttach, `{"version":1,"error":{"code":103,"msg":"no address"}}`, 0},
		{"attach without body", OpAttach, `{"version":1}`, CodeDecodingFailure},
		{"gc without body", OpGC, `{"version":1}`, CodeDecodingFailure},
		{"wrong version", OpStatus, `{"version":3,"status":{}}`, CodeVersionMismatch},
		{"garbage", OpStatus, `<html>`, CodeDecodingFailure},
		{"trailing", OpStatus, `{"version":1,"status":{}}{}`, CodeDecodingFailure},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := DecodeResponse([]byte(tc.in), tc.op)
			if got := codeOf(err); got != tc.code {
				t.Fatalf("code %d (%v), want %d", got, err, tc.code)
			}
			if tc.code == 0 && resp == nil {
				t.Fatal("nil response")
			}
		})
	}
}

// TestToCNI checks that codes survive conversion to the CNI library's error.
func TestToCNI(t *testing.T) {
	e := NewError(CodeNoSuchAttachment, "no attachment", "c1/eth0")
	tests := []struct {
		name     string
		err      error
		code     uint
		msg, det string
	}{
		{"agent error", e, 102, "no attachment", "c1/eth0"},
		{"wrapped agent error", fmt.Errorf("detach: %w", e), 102, "detach: no attachment; c1/eth0", ""},
		{"cni error", ToCNI(e), 102, "no attachment", "c1/eth0"},
		{"plain error", errors.New("boom"), CodeInternal, "boom", ""},
		{"typed nil", (*Error)(nil), CodeInternal, "nil *agentapi.Error used as an error", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := ToCNI(tc.err)
			if got.Code != tc.code || got.Msg != tc.msg || got.Details != tc.det {
				t.Errorf("got %d %q %q, want %d %q %q", got.Code, got.Msg, got.Details, tc.code, tc.msg, tc.det)
			}
		})
	}
	if ToCNI(nil) != nil {
		t.Error("ToCNI(nil) is not nil")
	}
}
