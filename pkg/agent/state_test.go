package agent

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
)

func testRecord() *record {
	sz := queue.DefaultSizes()
	return &record{
		Version: recordVersion, ContainerID: "c1", IfName: "eth0", Kind: "shm", Netns: "/var/run/netns/c1",
		Network: "net", PodNS: "default", PodName: "p", Addrs: []netip.Addr{netip.MustParseAddr("10.244.1.2")},
		Allocated: true, MTU: 1500, PodMAC: "02:53:0a:f4:01:02", Queue: &sz,
		Bandwidth: &linkspec.Bandwidth{EgressRate: 5_000_000, EgressBurst: 1_000_000},
	}
}

// recordCases are parseRecord's table, also the fuzz seeds.
var recordCases = []struct {
	name string
	in   string
	want string // substring of the error; "" for success
}{
	{"shm", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"shm","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"allocated":true,"mtu":1500,"podMAC":"02:53:0a:f4:01:02","queue":{"dataSize":1048576,"pipeSize":65536,"bufferSize":2048}}`, ""},
	{"tap", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"tap","netns":"/n","network":"net","addrs":["10.244.1.2","2001:db8::2"],` +
		`"allocated":false,"mtu":1500,"podMAC":"02:00:00:00:00:01","tapName":"eth0","vnetHdr":true}`, ""},
	{"tap with bandwidth", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"tap","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"mtu":1500,"podMAC":"02:00:00:00:00:01","tapName":"eth0","bandwidth":{"ingressRate":1000000,"ingressBurst":1000000,"egressRate":0,"egressBurst":0}}`, ""},
	{"bad bandwidth", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"tap","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"mtu":1500,"podMAC":"02:00:00:00:00:01","tapName":"eth0","bandwidth":{"ingressRate":1000000}}`, "attach.bandwidth.ingressBurst"},
	{"tap without device", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"tap","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"mtu":1500,"podMAC":"02:00:00:00:00:01"}`, "device name"},
	{"unknown field", `{"version":1,"bogus":1}`, "unknown field"},
	{"other version", `{"version":7,"containerID":"c1","ifName":"eth0","kind":"tap","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"mtu":1500,"podMAC":"02:00:00:00:00:01","tapName":"eth0"}`, "version 7"},
	{"bad queue", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"shm","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"mtu":1500,"podMAC":"02:53:0a:f4:01:02","queue":{"dataSize":1,"pipeSize":1,"bufferSize":1}}`, "bufferSize"},
	{"no addresses", `{"version":1,"containerID":"c1","ifName":"eth0","kind":"tap","netns":"/n","network":"net",` +
		`"mtu":1500,"podMAC":"02:00:00:00:00:01","tapName":"eth0"}`, "no address"},
	{"bad id", `{"version":1,"containerID":"../x","ifName":"eth0","kind":"tap","netns":"/n","network":"net","addrs":["10.244.1.2"],` +
		`"mtu":1500,"podMAC":"02:00:00:00:00:01","tapName":"eth0"}`, "containerID"},
	{"trailing", `{"version":1} x`, "data after"},
	{"not json", `]`, "invalid character"},
}

// TestParseRecord checks acceptance and the error of each bad record.
func TestParseRecord(t *testing.T) {
	for _, tc := range recordCases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseRecord([]byte(tc.in))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("got %v, want success", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// FuzzParseRecord: no input crashes the parser; an accepted record
// validates.
func FuzzParseRecord(f *testing.F) {
	for _, tc := range recordCases {
		f.Add([]byte(tc.in))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRecord(b)
		if err != nil {
			return
		}
		if err := r.validate(); err != nil {
			t.Fatalf("accepted record does not validate: %v", err)
		}
	})
}

// TestStoreRoundTrip: put, load, remove; a crash's temporary file is
// removed on open; an unreadable record is reported and left in place.
func TestStoreRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := testRecord()
	if err := s.put(want); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(s.dir, "junk:eth0.json")
	os.WriteFile(bad, []byte("{"), 0o600)
	tmp := filepath.Join(s.dir, "x:eth0.json.tmp")
	os.WriteFile(tmp, []byte("half"), 0o600)

	s, err = openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Errorf("temporary file left: %v", err)
	}
	recs, badErrs, err := s.load()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1 || !reflect.DeepEqual(recs[0], want) {
		t.Errorf("loaded %+v, want [%+v]", recs, want)
	}
	if len(badErrs) != 1 || !strings.Contains(badErrs[0].Error(), "junk:eth0.json") {
		t.Errorf("bad records %v, want junk:eth0.json reported", badErrs)
	}
	if err := s.remove(want.key()); err != nil {
		t.Fatal(err)
	}
	if err := s.remove(want.key()); err != nil {
		t.Errorf("second remove: %v", err)
	}
	if recs, _, _ := s.load(); len(recs) != 0 {
		t.Errorf("records after remove: %v", recs)
	}
}

// TestPodMAC: locally administered unicast, derived from the first address.
func TestPodMAC(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want string
	}{
		{"10.244.1.5", "02:53:0a:f4:01:05"},
		{"2001:db8::a:b", "02:53:00:0a:00:0b"},
	} {
		got := podMACFor([]netip.Addr{netip.MustParseAddr(tc.addr)})
		if s := net.HardwareAddr(got).String(); s != tc.want {
			t.Errorf("podMACFor(%s) = %s, want %s", tc.addr, s, tc.want)
		}
	}
}
