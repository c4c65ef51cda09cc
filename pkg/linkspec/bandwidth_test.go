package linkspec

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestBandwidthValidate: the reference plugin's rules (a rate needs a
// burst, a burst a rate, a burst under 4 GB) and Kubernetes' bounds on the
// rate; every problem names its field.
func TestBandwidthValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		bw   Bandwidth
		want []string // substrings of the error; none: valid
	}{
		{"zero", Bandwidth{}, nil},
		{"ingress only", Bandwidth{IngressRate: 10_000_000, IngressBurst: 1_000_000}, nil},
		{"egress only", Bandwidth{EgressRate: 10_000_000, EgressBurst: 1_000_000}, nil},
		{"bounds", Bandwidth{IngressRate: MinBandwidthRate, IngressBurst: 1, EgressRate: MaxBandwidthRate, EgressBurst: MaxBandwidthBurst}, nil},
		{"containerd's burst", Bandwidth{IngressRate: 1_000_000, IngressBurst: 1<<32 - 1}, nil},
		{"rate without burst", Bandwidth{IngressRate: 1_000_000}, []string{"ingressBurst: required when ingressRate is set"}},
		{"burst without rate", Bandwidth{EgressBurst: 1_000_000}, []string{"egressRate: required when egressBurst is set"}},
		{"rate too small", Bandwidth{IngressRate: 999, IngressBurst: 1000}, []string{"ingressRate: 999 bit/s is not in 1000..1000000000000000"}},
		{"rate too large", Bandwidth{EgressRate: MaxBandwidthRate + 1, EgressBurst: 1000}, []string{"egressRate: 1000000000000001 bit/s is not in"}},
		{"burst too large", Bandwidth{IngressRate: 1000, IngressBurst: MaxBandwidthBurst + 1}, []string{"ingressBurst: 34359738360 bits is more than 34359738359"}},
		{"both directions", Bandwidth{IngressRate: 1, EgressBurst: 1 << 62}, []string{"ingressRate: 1 bit/s", "ingressBurst: required", "egressRate: required", "egressBurst: 4611686018427387904 bits"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.bw.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q, want it to contain %q", err, w)
				}
			}
		})
	}
}

// TestBandwidthJSON: the JSON names are the CNI conventions' (the
// capability's runtimeConfig object).
func TestBandwidthJSON(t *testing.T) {
	var got Bandwidth
	in := `{"ingressRate": 2048, "ingressBurst": 1600, "egressRate": 4096, "egressBurst": 1700}`
	if err := json.Unmarshal([]byte(in), &got); err != nil {
		t.Fatal(err)
	}
	if want := (Bandwidth{IngressRate: 2048, IngressBurst: 1600, EgressRate: 4096, EgressBurst: 1700}); got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if err := json.Unmarshal([]byte(`{"ingressRate": -1}`), &got); err == nil {
		t.Error("a negative rate decoded")
	}
}
