package agent

import (
	"regexp"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/shm-cni/shm-cni/pkg/policy"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// Metric names and their help, one table. "Receive" is what the router got
// from the pod, "transmit" what it sent to the pod.
var (
	linkLabels = []string{"namespace", "pod", "container_id", "ifname", "kind"}

	descRxPackets = prometheus.NewDesc("shm_cni_link_receive_packets_total",
		"Packets the router received from the pod on the link.", linkLabels, nil)
	descRxBytes = prometheus.NewDesc("shm_cni_link_receive_bytes_total",
		"Bytes the router received from the pod on the link.", linkLabels, nil)
	descTxPackets = prometheus.NewDesc("shm_cni_link_transmit_packets_total",
		"Packets the router sent to the pod on the link.", linkLabels, nil)
	descTxBytes = prometheus.NewDesc("shm_cni_link_transmit_bytes_total",
		"Bytes the router sent to the pod on the link.", linkLabels, nil)
	descDrops = prometheus.NewDesc("shm_cni_link_drops_total",
		"Packets the router dropped on the link (receive: unforwardable or malformed; transmit: no buffer space).",
		append(linkLabels[:len(linkLabels):len(linkLabels)], "direction"), nil)
	descEndpointDrops = prometheus.NewDesc("shm_cni_link_endpoint_drops_total",
		"Frames the link endpoint dropped (receive: malformed or oversized; transmit: the pod's queue or device was full).",
		append(linkLabels[:len(linkLabels):len(linkLabels)], "direction"), nil)
	descFiltered = prometheus.NewDesc("shm_cni_link_spoofed_drops_total",
		"Packets from the pod the anti-spoofing filter dropped before routing, by reason (source_mac, source_address, destination, arp, ndp, malformed, ethertype).",
		append(linkLabels[:len(linkLabels):len(linkLabels)], "reason"), nil)
	descViolations = prometheus.NewDesc("shm_cni_link_protocol_violations_total",
		"Shared-memory protocol violations by the sandbox; each cuts the sandbox off.", linkLabels, nil)
	descFast = prometheus.NewDesc("shm_cni_link_fast_path_packets_total",
		"Packets of the link's that the router's fast path handled (receive: from the pod, forwarded to another pod or dropped as unrouted; transmit: to the pod); part of the link's packet totals.",
		append(linkLabels[:len(linkLabels):len(linkLabels)], "direction"), nil)
	descThrottled = prometheus.NewDesc("shm_cni_link_receive_throttled_total",
		"Pauses of the agent's reading from the pod's link because the pod sent more than its limit (--link-max-pps, --link-max-bytes).", linkLabels, nil)
	descTxWaits = prometheus.NewDesc("shm_cni_link_transmit_waits_total",
		"Frames for the pod that found its receive queue full and waited for room (--shm-tx-wait) instead of being dropped at once.", linkLabels, nil)
	descOneCopy = prometheus.NewDesc("shm_cni_link_one_copy_total",
		"Frames the agent wrote to the pod straight from a sandbox's shared memory, copied once (large TCP segments on the fast path; the rest cross private memory).", linkLabels, nil)
	descBandwidthDelayed = prometheus.NewDesc("shm_cni_link_bandwidth_delayed_total",
		"Packets the pod's bandwidth limit (the CNI bandwidth capability) held until its token bucket covered them, by direction (ingress: to the pod; egress: from the pod); 0 for a pod without a limit. On a veth link, the times its tbf qdisc's head packet waited for tokens (the qdisc's overlimits).",
		append(linkLabels[:len(linkLabels):len(linkLabels)], "direction"), nil)
	descBandwidthDrops = prometheus.NewDesc("shm_cni_link_bandwidth_drops_total",
		"Packets the pod's bandwidth limit dropped because its queue was full, by direction (ingress: to the pod; egress: from the pod); 0 for a pod without a limit. On a veth link, its tbf qdisc's drops.",
		append(linkLabels[:len(linkLabels):len(linkLabels)], "direction"), nil)
	descLinkUp = prometheus.NewDesc("shm_cni_link_up",
		"1 when the link is attached to the router (a shm link: a sandbox is connected), else 0.", linkLabels, nil)
	descAttachments = prometheus.NewDesc("shm_cni_attachments",
		"Attachments the agent holds.", []string{"kind"}, nil)
	descUnrouted = prometheus.NewDesc("shm_cni_unrouted_drops_total",
		"Packets for pod CIDR addresses without a link, dropped by the router.", nil, nil)
	descHairpinConns = prometheus.NewDesc("shm_cni_hairpin_connections",
		"Connections from a local pod to a local pod that the host turned back into the router (a Service whose endpoint is on this node), whose replies the router sends back through the host.", nil, nil)
	descHairpinAdded = prometheus.NewDesc("shm_cni_hairpin_connections_total",
		"Connections the hairpin table took in.", nil, nil)
	descHairpinRefused = prometheus.NewDesc("shm_cni_hairpin_refused_total",
		"Connections the hairpin table had no room for (all of it, or the client pod's share, in use), whose packets were dropped.", nil, nil)
	descHairpinPackets = prometheus.NewDesc("shm_cni_hairpin_packets_total",
		"Packets of hairpin connections' endpoints sent back through the host.", nil, nil)
	descHairpinDropped = prometheus.NewDesc("shm_cni_hairpin_dropped_packets_total",
		"Packets of hairpin connections' endpoints dropped (no uplink, or headers the router does not forward).", nil, nil)
	descHostForwarding = prometheus.NewDesc("shm_cni_host_forwarding",
		"1 when the host forwards the family's pod traffic (IPv4: forwarding on the uplink; IPv6: net.ipv6.conf.all.forwarding), as last checked.",
		[]string{"family"}, nil)
	policyLabels     = []string{"namespace", "pod"}
	descPolicyDenied = prometheus.NewDesc("shm_cni_policy_denied_packets_total",
		"Packets NetworkPolicy denied, by the local pod whose policy denied them and direction (ingress, egress).",
		append(policyLabels[:len(policyLabels):len(policyLabels)], "direction"), nil)
	descNetworkPolicyDenied = prometheus.NewDesc("shm_cni_networkpolicy_denied_packets_total",
		"Packets NetworkPolicy denied to or from the local pods the policy selects in the direction (ingress, egress): a denied packet counts against every policy isolating its pod in its direction, none of which allowed it, so these add up to more than the packets denied where several policies select a pod.",
		[]string{"namespace", "networkpolicy", "direction"}, nil)
	descPolicyRefused = prometheus.NewDesc("shm_cni_policy_tracker_refused_total",
		"New connections of a local pod that policy allowed but the connection tracker had no room for (its share is full), so were dropped.",
		policyLabels, nil)
	descPolicyConns = prometheus.NewDesc("shm_cni_policy_tracked_connections",
		"Connections the policy connection tracker holds, charged to the local pod.", policyLabels, nil)
	descPolicyProblems = prometheus.NewDesc("shm_cni_policy_problems",
		"What the installed NetworkPolicy snapshot skipped (invalid selectors, CIDRs, addresses; /policy lists them).", nil, nil)
	descHostRepairs = prometheus.NewDesc("shm_cni_host_repairs_total",
		"The agent's rules on the host (forward-path accepts, masquerade table) that another program removed or moved and the agent put back.", nil, nil)
	descPolicyQueued = prometheus.NewDesc("shm_cni_policy_queued_packets_total",
		"Packets of veth links the host queued to the agent for NetworkPolicy (the first of each connection of an isolated pod), by verdict.", []string{"verdict"}, nil)
	descPolicyRevoked = prometheus.NewDesc("shm_cni_policy_revoked_connections_total",
		"Connections of veth links the host tracked that a new NetworkPolicy snapshot denied, deleted from the host's connection tracking.", nil, nil)
)

// metrics is the agent's Prometheus registry.
type metrics struct {
	reg *prometheus.Registry // immutable
	// attachDuration observes attach requests by kind and result.
	attachDuration *prometheus.HistogramVec // immutable
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		attachDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "shm_cni_attach_duration_seconds",
			Help: "Time to serve an attach request, by link kind and result.",
			// 100 us to ~3.3 s: 16 buckets doubling (100e-6 * 2^15).
			Buckets: prometheus.ExponentialBuckets(100e-6, 2, 16),
		}, []string{"kind", "result"}),
	}
	m.reg.MustRegister(
		m.attachDuration,
		&linkCollector{a: a},
		// The default set plus the live heap as of the last collection
		// (go_gc_heap_live_bytes), which, unlike the in-use heap, does not
		// count the garbage made since.
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/gc/heap/live:bytes$`)})),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

func (m *metrics) observeAttach(kind string, err error, d time.Duration) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.attachDuration.WithLabelValues(kind, result).Observe(d.Seconds())
}

// linkCollector reads the links' counters at scrape time.
type linkCollector struct {
	a *Agent // immutable
}

var _ prometheus.Collector = (*linkCollector)(nil)

// Describe implements prometheus.Collector.Describe.
func (c *linkCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRxPackets, descRxBytes, descTxPackets, descTxBytes,
		descDrops, descFiltered, descEndpointDrops, descViolations, descThrottled, descOneCopy, descTxWaits, descFast, descBandwidthDelayed, descBandwidthDrops, descLinkUp, descAttachments, descUnrouted,
		descHairpinConns, descHairpinAdded, descHairpinRefused, descHairpinPackets, descHairpinDropped, descHostForwarding, descHostRepairs,
		descPolicyQueued, descPolicyRevoked, descPolicyDenied, descNetworkPolicyDenied, descPolicyRefused, descPolicyConns, descPolicyProblems} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.Collect.
func (c *linkCollector) Collect(ch chan<- prometheus.Metric) {
	byKind := map[string]int{"tap": 0, "shm": 0, "veth": 0}
	for _, st := range c.a.linkStatus() {
		byKind[st.Kind]++
		l := []string{st.PodNamespace, st.PodName, st.ContainerID, st.IfName, st.Kind}
		counter := func(d *prometheus.Desc, v uint64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append(l[:len(l):len(l)], extra...)...)
		}
		up := 0.0
		if st.Up {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descLinkUp, prometheus.GaugeValue, up, l...)
		if r := st.Router; r != nil {
			counter(descRxPackets, r.RxPackets)
			counter(descRxBytes, r.RxBytes)
			counter(descTxPackets, r.TxPackets)
			counter(descTxBytes, r.TxBytes)
			counter(descDrops, r.RxDrops, "receive")
			counter(descDrops, r.TxDrops, "transmit")
			counter(descFast, r.FastRxPackets, "receive")
			counter(descFast, r.FastTxPackets, "transmit")
			counter(descBandwidthDelayed, r.BandwidthIngressDelayed, "ingress")
			counter(descBandwidthDelayed, r.BandwidthEgressDelayed, "egress")
			counter(descBandwidthDrops, r.BandwidthIngressDrops, "ingress")
			counter(descBandwidthDrops, r.BandwidthEgressDrops, "egress")
			for _, reason := range router.DropReasons() {
				counter(descFiltered, r.Filtered[reason], reason.String())
			}
		}
		if e := st.Endpoint; e != nil {
			counter(descEndpointDrops, e.RxDrops, "receive")
			counter(descEndpointDrops, e.TxDrops, "transmit")
			counter(descViolations, e.Violations)
			counter(descThrottled, e.RxThrottled)
			counter(descOneCopy, e.TxOneCopy)
			counter(descTxWaits, e.TxWaits)
		}
	}
	kinds := make([]string, 0, len(byKind))
	for k := range byKind {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		ch <- prometheus.MustNewConstMetric(descAttachments, prometheus.GaugeValue, float64(byKind[k]), k)
	}
	ch <- prometheus.MustNewConstMetric(descUnrouted, prometheus.CounterValue, float64(c.a.router.UnroutedDrops()))
	hp := c.a.router.HairpinStats()
	ch <- prometheus.MustNewConstMetric(descHairpinConns, prometheus.GaugeValue, float64(hp.Conns))
	ch <- prometheus.MustNewConstMetric(descHairpinAdded, prometheus.CounterValue, float64(hp.Added))
	ch <- prometheus.MustNewConstMetric(descHairpinRefused, prometheus.CounterValue, float64(hp.Refused))
	ch <- prometheus.MustNewConstMetric(descHairpinPackets, prometheus.CounterValue, float64(hp.Diverted))
	ch <- prometheus.MustNewConstMetric(descHairpinDropped, prometheus.CounterValue, float64(hp.Dropped))
	v4, v6 := c.a.router.HostForwarding()
	for _, f := range []struct {
		name string
		on   bool
	}{{"ipv4", v4}, {"ipv6", v6}} {
		on := 0.0
		if f.on {
			on = 1
		}
		ch <- prometheus.MustNewConstMetric(descHostForwarding, prometheus.GaugeValue, on, f.name)
	}
	ch <- prometheus.MustNewConstMetric(descHostRepairs, prometheus.CounterValue, float64(c.a.router.HostRepairs()))
	if hp, ok := c.a.router.HostPolicyCounts(); ok {
		ch <- prometheus.MustNewConstMetric(descPolicyQueued, prometheus.CounterValue, float64(hp.Queued-hp.Denied), "accept")
		ch <- prometheus.MustNewConstMetric(descPolicyQueued, prometheus.CounterValue, float64(hp.Denied), "drop")
		ch <- prometheus.MustNewConstMetric(descPolicyRevoked, prometheus.CounterValue, float64(hp.Revoked))
	}
	if snap := c.a.router.Policy(); snap != nil {
		ch <- prometheus.MustNewConstMetric(descPolicyProblems, prometheus.GaugeValue, float64(len(snap.Problems())))
	}
	for _, p := range c.a.router.PolicyCounts() {
		for _, d := range []policy.Direction{policy.Ingress, policy.Egress} {
			ch <- prometheus.MustNewConstMetric(descPolicyDenied, prometheus.CounterValue, float64(p.Denied[d]), p.Namespace, p.Pod, d.String())
		}
		ch <- prometheus.MustNewConstMetric(descPolicyRefused, prometheus.CounterValue, float64(p.Refused), p.Namespace, p.Pod)
		ch <- prometheus.MustNewConstMetric(descPolicyConns, prometheus.GaugeValue, float64(p.Conns), p.Namespace, p.Pod)
	}
	for _, p := range c.a.router.NetworkPolicyCounts() {
		for _, d := range []policy.Direction{policy.Ingress, policy.Egress} {
			if p.Isolates[d] {
				ch <- prometheus.MustNewConstMetric(descNetworkPolicyDenied, prometheus.CounterValue, float64(p.Denied[d]), p.Namespace, p.Policy, d.String())
			}
		}
	}
}
