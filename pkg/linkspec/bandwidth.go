package linkspec

import (
	"errors"
	"fmt"
	"math"
)

// Bandwidth is a pod link's bandwidth limit: the CNI "bandwidth"
// capability (the runtime passes it as runtimeConfig.bandwidth when the
// plugin's conflist entry declares "capabilities": {"bandwidth": true};
// Kubernetes runtimes fill it from the pod annotations
// kubernetes.io/ingress-bandwidth and kubernetes.io/egress-bandwidth).
// Rates are in bits per second, bursts in bits, as the CNI conventions
// define the capability. Ingress is traffic to the pod, egress traffic
// from it. A direction whose rate and burst are 0 is not limited.
//
// Neither CNI library exports a type for it: the conventions document the
// JSON (containernetworking/cni's CONVENTIONS.md) and the reference
// bandwidth plugin's BandwidthEntry lives in its package main. Bandwidth
// has the same fields, JSON names and rules (Validate).
type Bandwidth struct {
	IngressRate  uint64 `json:"ingressRate"`
	IngressBurst uint64 `json:"ingressBurst"`
	EgressRate   uint64 `json:"egressRate"`
	EgressBurst  uint64 `json:"egressBurst"`
}

// Bounds of a Bandwidth's values.
const (
	// MinBandwidthRate and MaxBandwidthRate bound a limited direction's
	// rate, 1 kbit/s to 1 Pbit/s: what Kubernetes accepts in the pod
	// annotations (k8s.io/kubernetes pkg/util/bandwidth: "unreasonably
	// small (< 1kbit)", "unreasonably large (> 1Pbit)").
	MinBandwidthRate = 1_000
	MaxBandwidthRate = 1_000_000_000_000_000
	// MaxBandwidthBurst is the largest burst, (2^32-1)*8-1 bits (just
	// under 4 GiB): the reference bandwidth plugin refuses burst/8 >=
	// 2^32-1 ("burst cannot be more than 4GB"). CRI-O passes exactly
	// this burst for an annotation; containerd passes 2^32-1 bits
	// (512 MiB).
	MaxBandwidthBurst = math.MaxUint32*8 - 1
)

// IsZero reports whether b limits nothing.
func (b Bandwidth) IsZero() bool { return b == Bandwidth{} }

// Validate reports every problem of b (errors.Join), each naming its field
// by its JSON name ("ingressRate: ..."). As the reference plugin, a rate
// needs a burst and a burst a rate; beyond it, rates are bounded as
// Kubernetes bounds the annotations.
func (b Bandwidth) Validate() error {
	errs := checkDirection(nil, "ingress", b.IngressRate, b.IngressBurst)
	errs = checkDirection(errs, "egress", b.EgressRate, b.EgressBurst)
	return errors.Join(errs...)
}

// checkDirection appends the problems of one direction to errs.
func checkDirection(errs []error, dir string, rate, burst uint64) []error {
	switch {
	case rate == 0 && burst != 0:
		errs = append(errs, fmt.Errorf("%sRate: required when %sBurst is set (bits per second, %d..%d)", dir, dir, uint64(MinBandwidthRate), uint64(MaxBandwidthRate)))
	case rate != 0 && (rate < MinBandwidthRate || rate > MaxBandwidthRate):
		errs = append(errs, fmt.Errorf("%sRate: %d bit/s is not in %d..%d (1 kbit/s to 1 Pbit/s)", dir, rate, uint64(MinBandwidthRate), uint64(MaxBandwidthRate)))
	}
	switch {
	case rate != 0 && burst == 0:
		errs = append(errs, fmt.Errorf("%sBurst: required when %sRate is set (bits, 1..%d)", dir, dir, uint64(MaxBandwidthBurst)))
	case burst > MaxBandwidthBurst:
		errs = append(errs, fmt.Errorf("%sBurst: %d bits is more than %d (4 GB, the reference bandwidth plugin's limit)", dir, burst, uint64(MaxBandwidthBurst)))
	}
	return errs
}

// String describes b for logs: "ingress 10000000 bit/s burst 1000000 bit,
// egress unlimited".
func (b Bandwidth) String() string {
	dir := func(name string, rate, burst uint64) string {
		if rate == 0 && burst == 0 {
			return name + " unlimited"
		}
		return fmt.Sprintf("%s %d bit/s burst %d bit", name, rate, burst)
	}
	return dir("ingress", b.IngressRate, b.IngressBurst) + ", " + dir("egress", b.EgressRate, b.EgressBurst)
}
