package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

// report is everything one run measured.
type report struct {
	Machine    machine           `json:"machine"`
	LoadBefore string            `json:"loadavgBefore"`
	LoadAfter  string            `json:"loadavgAfter"`
	Started    string            `json:"started"`
	Commit     string            `json:"commit"`
	Seconds    float64           `json:"seconds"`
	Reps       int               `json:"reps"`
	Config     map[string]string `json:"config"`
	Throughput []tputRow         `json:"throughput,omitempty"`
	Latency    []rttRow          `json:"latency,omitempty"`
	Trace      *traceReport      `json:"trace,omitempty"`
	CNI        []cniRow          `json:"cni,omitempty"`
	Idle       []idleRow         `json:"idle,omitempty"`
	Policy     []policyRow       `json:"policy,omitempty"`
	Goals      []goal            `json:"goals"`
}

// tputRow is a throughput case; Ratio is to the veth pair's iperf3 figure
// with as many streams.
type tputRow struct {
	Case      string    `json:"case"`
	Tool      string    `json:"tool"`
	Reference bool      `json:"reference"`
	Streams   int       `json:"streams"`
	Gbps      []float64 `json:"gbps"`
	Median    float64   `json:"medianGbps"`
	Ratio     float64   `json:"ratioToVeth"`
	// CPUPerGiB is the machine's busy CPU seconds per GiB moved, per run
	// (everything running: agent, sandboxes, kernel, the tools).
	CPUPerGiB       []float64 `json:"cpuSecondsPerGiB"`
	MedianCPUPerGiB float64   `json:"medianCPUSecondsPerGiB"`
	CPURatio        float64   `json:"cpuRatioToVeth"`
	// AgentCPUPerGiB and SandboxCPUPerGiB are, for shm-cni's cases, the
	// part of it the agent and the node's sandbox programs spent, from
	// their own CPU times (exact whatever else runs on the machine).
	AgentCPUPerGiB         []float64 `json:"agentCPUSecondsPerGiB,omitempty"`
	MedianAgentCPUPerGiB   float64   `json:"medianAgentCPUSecondsPerGiB,omitempty"`
	SandboxCPUPerGiB       []float64 `json:"sandboxCPUSecondsPerGiB,omitempty"`
	MedianSandboxCPUPerGiB float64   `json:"medianSandboxCPUSecondsPerGiB,omitempty"`
	// Senders is, per run of a case whose senders are sandbox programs,
	// how their netstacks' TCP fared: loss recoveries, those found
	// spurious, retransmissions, segments and ACKs.
	Senders []node.SenderTCP `json:"sandboxSenders,omitempty"`
	// AgentTxDrops is, per run of a case whose senders are sandbox
	// programs, the frames the agent's link endpoints dropped toward pods
	// for want of room (a full ring or TAP queue, after the wait they
	// allow; every link of the node), or nil where the agent's metrics
	// could not be read.
	AgentTxDrops []int64 `json:"agentTxDrops,omitempty"`
	Error        string  `json:"error,omitempty"`
}

// rttRow is a latency case; ratios are to the veth pair's.
type rttRow struct {
	Case      string    `json:"case"`
	Tool      string    `json:"tool"`
	Reference bool      `json:"reference"`
	P50us     []float64 `json:"p50us"`
	P99us     []float64 `json:"p99us"`
	MedianP50 float64   `json:"medianP50us"`
	MedianP99 float64   `json:"medianP99us"`
	RatioP50  float64   `json:"p50RatioToVeth"`
	RatioP99  float64   `json:"p99RatioToVeth"`
	Error     string    `json:"error,omitempty"`
}

// cniRow is a plugin's ADD and DEL latency; ratios are to bridge's.
type cniRow struct {
	Plugin    string    `json:"plugin"`
	Reference bool      `json:"reference"`
	AddP50ms  []float64 `json:"addP50ms"`
	AddP99ms  []float64 `json:"addP99ms"`
	DelP50ms  []float64 `json:"delP50ms"`
	DelP99ms  []float64 `json:"delP99ms"`
	AddCPUms  []float64 `json:"addCPUms"`
	DelCPUms  []float64 `json:"delCPUms"`
	// The plugins' processes alone, per ADD (childrenUsage).
	AddProcCPUms  []float64  `json:"addProcessCPUms"`
	AddProcFaults []float64  `json:"addProcessPageFaults"`
	Medians       [4]float64 `json:"medianAddP50AddP99DelP50DelP99ms"`
	MedianCPU     [2]float64 `json:"medianAddDelCPUms"`
	MedianProc    [2]float64 `json:"medianAddProcessCPUmsPageFaults"`
	AddP99Ratio   float64    `json:"addP99RatioToBridge"`
	AddCPURatio   float64    `json:"addCPURatioToBridge"`
	Error         string     `json:"error,omitempty"`
}

func (r *cniRow) finish() {
	r.Medians = [4]float64{median(r.AddP50ms), median(r.AddP99ms), median(r.DelP50ms), median(r.DelP99ms)}
	r.MedianCPU = [2]float64{median(r.AddCPUms), median(r.DelCPUms)}
	r.MedianProc = [2]float64{median(r.AddProcCPUms), median(r.AddProcFaults)}
}

// idleRow is the agent at rest with Pods attached tap pods.
type idleRow struct {
	Pods       int       `json:"pods"`
	RSSMiB     []float64 `json:"rssMiB"`
	CPUPercent []float64 `json:"cpuPercentOfACore"`
	MedianRSS  float64   `json:"medianRSSMiB"`
	MedianCPU  float64   `json:"medianCPUPercent"`
	PerPodKiB  float64   `json:"rssPerPodKiB"`
}

// goal is one of the project's targets and whether this run met it.
type goal struct {
	Name  string  `json:"name"`
	Want  string  `json:"want"`
	Got   string  `json:"got"`
	Met   *bool   `json:"met"` // nil: not measured
	Value float64 `json:"value"`
}

func (r *report) tput(name string, streams int, tool string) *tputRow {
	for i := range r.Throughput {
		t := &r.Throughput[i]
		if t.Case == name && t.Streams == streams && (tool == "" || t.Tool == tool) && t.Median > 0 {
			return t
		}
	}
	return nil
}

func (r *report) rateThroughput() {
	for i := range r.Throughput {
		t := &r.Throughput[i]
		if v := r.tput("veth pair", t.Streams, "iperf3"); v != nil {
			t.Ratio = ratio(t.Median, v.Median)
			t.CPURatio = ratio(t.MedianCPUPerGiB, v.MedianCPUPerGiB)
		}
	}
}

func (r *report) rtt(name string) *rttRow {
	for i := range r.Latency {
		if r.Latency[i].Case == name && r.Latency[i].MedianP50 > 0 {
			return &r.Latency[i]
		}
	}
	return nil
}

func (r *report) rateLatency() {
	v := r.rtt("veth pair")
	for i := range r.Latency {
		if v != nil {
			r.Latency[i].RatioP50 = ratio(r.Latency[i].MedianP50, v.MedianP50)
			r.Latency[i].RatioP99 = ratio(r.Latency[i].MedianP99, v.MedianP99)
		}
	}
}

func (r *report) rateCNI() {
	var br *cniRow
	for i := range r.CNI {
		if r.CNI[i].Plugin == "bridge" && r.CNI[i].Medians[1] > 0 {
			br = &r.CNI[i]
		}
	}
	for i := range r.CNI {
		if br != nil {
			r.CNI[i].AddP99Ratio = ratio(r.CNI[i].Medians[1], br.Medians[1])
			r.CNI[i].AddCPURatio = ratio(r.CNI[i].MedianCPU[0], br.MedianCPU[0])
		}
	}
}

func (r *report) rateIdle() {}

// evaluateGoals marks each goal met or not met from what was measured.
func (r *report) evaluateGoals() {
	r.Goals = nil
	add := func(name, want string, measured bool, value float64, got string, met bool) {
		g := goal{Name: name, Want: want, Got: "not measured"}
		if measured {
			g.Got, g.Value, g.Met = got, value, &met
		}
		r.Goals = append(r.Goals, g)
	}
	tputGoal := func(name, label string, want float64) {
		t := r.tput(name, 1, "")
		ok := t != nil && t.Ratio > 0
		var v float64
		if ok {
			v = t.Ratio
		}
		add(label+" throughput (1 stream)", fmt.Sprintf("≥ %.1fx veth", want), ok, v, fmt.Sprintf("%.2fx", v), v >= want)
	}
	// The goals of the issue "Sandbox links at kernel speed".
	tputGoal("shm-cni sandbox → sandbox", "sandbox↔sandbox", 1.0)
	// Against what a sandbox has without shm-cni: the same netstack over
	// AF_PACKET on the bridge plugin's veths, the better of the two
	// variants.
	if t := r.tput("shm-cni sandbox → sandbox", 1, ""); t != nil {
		var best float64
		for _, c := range []string{"AF_PACKET sandbox → sandbox (bridge)", "AF_PACKET+GSO sandbox → sandbox (bridge)"} {
			if p := r.tput(c, 1, ""); p != nil {
				best = max(best, p.Median)
			}
		}
		v := ratio(t.Median, best)
		add("sandbox↔sandbox throughput (1 stream) against the same netstack over AF_PACKET", "≥ 3.0x", best > 0, v, fmt.Sprintf("%.2fx", v), v >= 3)
		add("sandbox↔sandbox CPU-s per GiB (1 stream)", "≤ 2.0x veth", t.CPURatio > 0, t.CPURatio, fmt.Sprintf("%.2fx", t.CPURatio), t.CPURatio <= 2)
	} else {
		add("sandbox↔sandbox throughput (1 stream) against the same netstack over AF_PACKET", "≥ 3.0x", false, 0, "", false)
		add("sandbox↔sandbox CPU-s per GiB (1 stream)", "≤ 2.0x veth", false, 0, "", false)
	}
	tputGoal("shm-cni tap pod → sandbox", "kernel pod → sandbox", 0.7)
	tputGoal("shm-cni sandbox → tap pod", "sandbox → kernel pod", 0.7)
	tputGoal("shm-cni veth pod → sandbox", "kernel pod on a veth link → sandbox", 0.7)
	tputGoal("shm-cni sandbox → veth pod", "sandbox → kernel pod on a veth link", 0.7)
	// Traffic leaving the node: a sandbox's path through the uplink in
	// line with its path to a kernel pod.
	{
		o, k := r.tput("shm-cni sandbox → outside", 1, ""), r.tput("shm-cni sandbox → tap pod", 1, "")
		ok := o != nil && k != nil && k.Median > 0
		var v float64
		if ok {
			v = ratio(o.Median, k.Median)
		}
		add("sandbox → outside throughput (1 stream) against sandbox → kernel pod", "≥ 0.9x", ok, v, fmt.Sprintf("%.2fx", v), v >= 0.9)
	}
	tputGoal("shm-cni tap pod → tap pod", "kernel↔kernel", 0.9)
	limitGoal(r, add)
	tputGoal("shm-cni host → tap pod", "host → pod", 0.9)
	tputGoal("shm-cni tap pod → host", "pod → host", 0.9)
	// The same with kernel pods on veth links (kind veth).
	tputGoal("shm-cni veth pod → veth pod", "kernel↔kernel on veth links", 0.9)
	tputGoal("shm-cni host → veth pod", "host → pod on a veth link", 0.9)
	tputGoal("shm-cni veth pod → host", "pod on a veth link → host", 0.9)
	for _, c := range []struct{ name, label string }{
		{"shm-cni sandbox → sandbox", "sandbox↔sandbox"},
		{"shm-cni tap pod → tap pod", "tap↔tap"},
		{"shm-cni veth pod → veth pod", "veth↔veth"},
	} {
		s := r.rtt(c.name)
		add("64 B RTT p50 "+c.label, "≤ 2.0x veth", s != nil && s.RatioP50 > 0, ratioOf(s), fmt.Sprintf("%.2fx", ratioOf(s)), ratioOf(s) <= 2.0)
	}
	// NetworkPolicy's cost on the fast path (issue 16): the worst of
	// the pairs' throughput and p50 round trip at the largest count.
	{
		worst, count, measured := 1.0, 0, false
		for _, p := range r.Policy {
			count = max(count, p.Policies)
		}
		for _, p := range r.Policy {
			if p.Policies != count || count == 0 || p.Ratio <= 0 || p.Measure == "p99 µs" || p.Measure == connectP50 {
				continue
			}
			measured = true
			cost := p.Ratio // latency: slower is more
			if p.Measure == "Gbit/s" {
				cost = 1 / p.Ratio
			}
			worst = max(worst, cost)
		}
		add(fmt.Sprintf("fast path with %d NetworkPolicies (throughput, 64 B RTT p50)", count), "≤ 1.10x the cost without policy", measured, worst,
			fmt.Sprintf("%.2fx", worst), worst <= 1.10)
	}
	// The slowest of shm-cni's kinds holds the goal.
	var shm *cniRow
	for i := range r.CNI {
		if strings.HasPrefix(r.CNI[i].Plugin, "shm-cni") && r.CNI[i].AddP99Ratio > 0 &&
			(shm == nil || r.CNI[i].AddP99Ratio > shm.AddP99Ratio) {
			shm = &r.CNI[i]
		}
	}
	var cr float64
	got := ""
	if shm != nil {
		cr = shm.AddP99Ratio
		got = fmt.Sprintf("%.2fx, %s", cr, strings.TrimPrefix(shm.Plugin, "shm-cni "))
	}
	add("CNI ADD p99 (the slowest kind)", "≤ 0.5x bridge", shm != nil, cr, got, cr <= 0.5)
	if len(r.Idle) > 0 {
		last := r.Idle[len(r.Idle)-1]
		add(fmt.Sprintf("idle agent CPU (%d pods)", last.Pods), "≤ 1% of a core", true, last.MedianCPU, fmt.Sprintf("%.2f%%", last.MedianCPU), last.MedianCPU <= 1)
		measured := last.Pods > 0 && r.Idle[0].Pods == 0
		add(fmt.Sprintf("idle agent RSS per pod (%d pods)", last.Pods), "≤ 1 MiB (tap pods: no queue memory)", measured, last.PerPodKiB,
			fmt.Sprintf("%.0f KiB", last.PerPodKiB), last.PerPodKiB <= 1024)
	} else {
		add("idle agent CPU", "≤ 1% of a core", false, 0, "", false)
		add("idle agent RSS per pod", "≤ 1 MiB", false, 0, "", false)
	}
}

func ratioOf(r *rttRow) float64 {
	if r == nil {
		return 0
	}
	return r.RatioP50
}

// write prints the Markdown to w and writes bench.md, bench.json and the
// plot bench.svg to dir.
func (r *report) write(w io.Writer, dir string) error {
	var b strings.Builder
	r.markdown(&b)
	if _, err := io.WriteString(w, b.String()); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bench.md"), []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bench.json"), append(j, '\n'), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bench.svg"), []byte(r.svg()), 0o644); err != nil {
		return fmt.Errorf("write report: %w", err)
	}
	return nil
}

func errNote(e string) string {
	if e == "" {
		return ""
	}
	if len(e) > 80 {
		e = e[:80] + "…"
	}
	return " (failed: " + strings.ReplaceAll(e, "|", "/") + ")"
}

func (r *report) markdown(b *strings.Builder) {
	fmt.Fprintf(b, "# shm-cni benchmarks\n\n")
	fmt.Fprintf(b, "Machine: %d CPUs, %s, kernel %s. Load average before %s, after %s. Started %s at commit %s, took %.0f s. Medians of %d repetitions.\n\n",
		r.Machine.NProc, r.Machine.CPU, r.Machine.Kernel, r.LoadBefore, r.LoadAfter, r.Started, r.Commit, r.Seconds, r.Reps)
	if args := r.Config["agent-args"]; args != "" {
		fmt.Fprintf(b, "shm-agent run with %s (-agent-args).\n\n", args)
	}
	if env := r.Config["agent-env"]; env != "" {
		fmt.Fprintf(b, "shm-agent's environment adds %s (-agent-env).\n\n", env)
	}
	if env := r.Config["sandbox-env"]; env != "" {
		fmt.Fprintf(b, "The sandbox programs' environment (shm-cni's and the AF_PACKET references') adds %s (-sandbox-env).\n\n", env)
	}
	if mtu := r.Config["mtu"]; mtu != "" && mtu != "1500" {
		fmt.Fprintf(b, "shm-cni's kernel pod links and uplink at MTU %s (-mtu); the veth, ptp and bridge references at 1500.\n\n", mtu)
	}
	if mtu := r.Config["shm-mtu"]; mtu != "" {
		fmt.Fprintf(b, "shm-cni's sandbox links at MTU %s (-shm-mtu).\n\n", mtu)
	}
	if only := r.Config["only"]; only != "" {
		fmt.Fprintf(b, "Traffic cases matching %q only (-only), beside the references.\n\n", only)
	}
	if len(r.Throughput) > 0 {
		fmt.Fprintf(b, "## TCP throughput (IPv4; ratio to the veth pair's iperf3 figure)\n\n")
		fmt.Fprintf(b, "%s ", transferLength(r.Config))
		fmt.Fprintf(b, "Sandbox ends and the Go transfer send zeros and count what arrives (the tests verify data). CPU is the whole machine's busy time per GiB moved (agent, sandboxes, kernel, the tools themselves), lower is better; for shm-cni's cases, the agent's and the sandbox programs' own parts of it follow (from their CPU times: exact even on a busy machine; the rest is the kernel and the tools).\n\n")
		fmt.Fprintf(b, "| case | tool | streams | median Gbit/s | vs veth | runs | CPU-s per GiB | vs veth | agent | sandboxes |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|\n")
		for _, t := range r.Throughput {
			agent, sandboxes := "", ""
			if len(t.AgentCPUPerGiB) > 0 {
				agent, sandboxes = fmt.Sprintf("%.2f", t.MedianAgentCPUPerGiB), fmt.Sprintf("%.2f", t.MedianSandboxCPUPerGiB)
			}
			fmt.Fprintf(b, "| %s | %s | %d | %.2f | %.2fx | %s | %.2f | %.2fx | %s | %s |%s\n", t.Case, t.Tool, t.Streams, t.Median, t.Ratio,
				fmtList(t.Gbps, "%.2f"), t.MedianCPUPerGiB, t.CPURatio, agent, sandboxes, errNote(t.Error))
		}
		b.WriteString("\n")
		r.senderMarkdown(b)
	}
	if len(r.Latency) > 0 {
		fmt.Fprintf(b, "## 64 B TCP request/response latency (ratio to the veth pair)\n\n")
		fmt.Fprintf(b, "| case | tool | p50 µs | p99 µs | p50 vs veth | p99 vs veth |\n|---|---|---:|---:|---:|---:|\n")
		for _, t := range r.Latency {
			fmt.Fprintf(b, "| %s | %s | %.1f | %.1f | %.2fx | %.2fx |%s\n", t.Case, t.Tool, t.MedianP50, t.MedianP99, t.RatioP50, t.RatioP99, errNote(t.Error))
		}
		b.WriteString("\n")
	}
	if r.Trace != nil {
		r.traceMarkdown(b)
	}
	if len(r.CNI) > 0 {
		fmt.Fprintf(b, "## CNI latency, %s pods added then deleted concurrently through libcni (ratio to bridge)\n\n", r.Config["cni-pods"])
		fmt.Fprintf(b, "CPU is the whole machine's busy time during the %s ADDs (or DELs), per pod: the plugin and what it runs (an IPAM plugin, the agent), the kernel's work for them, and libcni's in the harness, which is the same for every plugin. The processes' columns are an ADD's plugin processes alone (the plugin and an IPAM plugin it runs, not the agent): their CPU time and minor page faults.\n\n", r.Config["cni-pods"])
		fmt.Fprintf(b, "| plugin | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | ADD p99 vs bridge | ADD CPU ms per pod | DEL CPU ms per pod | ADD CPU vs bridge | ADD processes' CPU ms | ADD processes' page faults |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, c := range r.CNI {
			fmt.Fprintf(b, "| %s | %.1f | %.1f | %.1f | %.1f | %.2fx | %.1f | %.1f | %.2fx | %.1f | %.0f |%s\n", c.Plugin, c.Medians[0], c.Medians[1], c.Medians[2], c.Medians[3], c.AddP99Ratio, c.MedianCPU[0], c.MedianCPU[1], c.AddCPURatio, c.MedianProc[0], c.MedianProc[1], errNote(c.Error))
		}
		b.WriteString("\n")
	}
	if len(r.Idle) > 0 {
		fmt.Fprintf(b, "## Idle shm-agent (attached idle tap pods; CPU over %s per count)\n\n", r.Config["idle-window"])
		fmt.Fprintf(b, "| pods | RSS MiB | RSS per pod KiB | CPU %% of a core |\n|---:|---:|---:|---:|\n")
		for _, i := range r.Idle {
			fmt.Fprintf(b, "| %d | %.1f | %.0f | %.2f |\n", i.Pods, i.MedianRSS, i.PerPodKiB, i.MedianCPU)
		}
		b.WriteString("\n")
	}
	if len(r.Policy) > 0 {
		r.policyMarkdown(b)
	}
	fmt.Fprintf(b, "## Goals\n\n| goal | want | got | |\n|---|---|---|---|\n")
	for _, g := range r.Goals {
		mark := "not measured"
		if g.Met != nil && *g.Met {
			mark = "met"
		} else if g.Met != nil {
			mark = "not met"
		}
		fmt.Fprintf(b, "| %s | %s | %s | %s |\n", g.Name, g.Want, g.Got, mark)
	}
}

func fmtList(xs []float64, f string) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprintf(f, x)
	}
	return strings.Join(s, " ")
}

// policyMarkdown writes the policy case's table: each pair's measure at
// each policy count, with its ratio to 0 policies.
func (r *report) policyMarkdown(b *strings.Builder) {
	fmt.Fprintf(b, "## NetworkPolicy on the fast path (ratio to the same pair with no policy, same run)\n\n")
	fmt.Fprintf(b, "The agent process reads the cluster (its pods, %d pods of other nodes, namespaces and %s NetworkPolicies) from the bench's list/watch server through its informers; the real compiler and enforcer. A tenth of the policies select the measured pods (a third of those restrict egress too), one lets them talk; the others select other pods. With 0 the agent has a snapshot without policy (a packet's headers are read and its pods looked up). Established connections' packets are tracker hits (on veth links, the host's), whatever the count; the count weighs on a connection's first packet (the connect measure: on veth links the host queues it to the agent) and on compiles. One stream; CPU is the agent's own per GiB.\n\n", remotePods, strings.ReplaceAll(strings.Trim(r.Config["policies"], "[]"), " ", "/"))
	fmt.Fprintf(b, "| case | measure | policies | median | vs 0 | runs | agent CPU-s per GiB | vs 0 |\n|---|---|---:|---:|---:|---|---:|---:|\n")
	for _, p := range r.Policy {
		cpu, cpuRatio := "", ""
		if len(p.AgentCPUPerGiB) > 0 {
			cpu, cpuRatio = fmt.Sprintf("%.2f", p.MedianAgentCPUPerGiB), fmt.Sprintf("%.2fx", p.AgentCPURatio)
			if p.AgentCPURatio <= 0 {
				cpuRatio = "—" // the agent is not on the path (veth links)
			}
		}
		fmt.Fprintf(b, "| %s | %s | %d | %.2f | %.2fx | %s | %s | %s |%s\n", p.Case, p.Measure, p.Policies, p.Median, p.Ratio,
			fmtList(p.Values, "%.2f"), cpu, cpuRatio, errNote(p.Error))
	}
	b.WriteString("\n")
}

// senderMarkdown lists, for the cases sandbox programs send in, their
// TCP's loss recoveries and timeouts per run: a recovery cuts the
// sender's window, one found spurious afterwards (late ACKs, no loss) too,
// and for good with the pinned gVisor (the runsc patch series undoes it,
// hack/runsc); a timeout cuts it to one segment.
func (r *report) senderMarkdown(b *strings.Builder) {
	var rows []tputRow
	for _, t := range r.Throughput {
		if len(t.Senders) > 0 {
			rows = append(rows, t)
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(b, "Sandbox senders' TCP, per run: loss recoveries (of them found spurious: late ACKs, nothing lost), retransmission timeouts, frames the sender's link dropped for want of room in its ring, frames the agent dropped toward pods for want of room in theirs (every link of the node), retransmitted segments, and segments sent per ACK received. Each recovery cuts the sender's congestion window, each timeout to one segment. The sandbox program's gVisor carries the runsc patch series (hack/runsc): 0012 undoes the cut of a recovery it finds spurious, 0013 takes no tail loss probe answered by late ACKs for a loss, 0014 retransmits a lost tail a window at a time (it sent one or two segments per timeout, tens of timeouts in a row), and 0018 has the receiving netstack report a duplicate in a D-SACK block, which tells the sender a probe was needless (without it, a probe that crossed late ACKs between two sandboxes ended in a cut).\n\n")
	fmt.Fprintf(b, "| case | streams | Gbit/s | recoveries (spurious) | timeouts | link drops | agent drops | retransmits | segments per ACK |\n|---|---:|---|---|---|---|---|---|---|\n")
	for _, t := range rows {
		var rec, tos, drops, agent, rtx, per []string
		for i, s := range t.Senders {
			rec = append(rec, fmt.Sprintf("%d (%d)", s.Recoveries, s.Spurious))
			tos = append(tos, fmt.Sprintf("%d", s.Timeouts))
			drops = append(drops, fmt.Sprintf("%d", s.LinkDrops))
			if len(t.AgentTxDrops) == len(t.Senders) {
				agent = append(agent, fmt.Sprintf("%d", t.AgentTxDrops[i]))
			} else {
				agent = append(agent, "-")
			}
			rtx = append(rtx, fmt.Sprintf("%d", s.Retransmits))
			if s.Acks > 0 {
				per = append(per, fmt.Sprintf("%.1f", float64(s.Segments)/float64(s.Acks)))
			} else {
				per = append(per, "-")
			}
		}
		fmt.Fprintf(b, "| %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", t.Case, t.Streams, fmtList(t.Gbps, "%.2f"),
			strings.Join(rec, " "), strings.Join(tos, " "), strings.Join(drops, " "), strings.Join(agent, " "), strings.Join(rtx, " "), strings.Join(per, " "))
	}
	b.WriteString("\n")
}

// transferLength says how long each measurement ran, from the config.
func transferLength(c map[string]string) string {
	t := c["time"]
	if t == "" {
		t = c["iperf-time"] // reports before -time
	}
	if n := c["bytes"]; n != "" && n != "0" {
		return fmt.Sprintf("iperf3 runs for %s; the Go and sandbox programs' transfers send %s bytes each (-bytes).", t, n)
	}
	return fmt.Sprintf("Every measurement runs for %s (-time): iperf3, and the Go and sandbox programs' transfers, so that a stream's start (its window's growth, a fresh sender's warm-up) weighs the same on every row.", t)
}

// traceMarkdown is the trace case's section: a sandbox round trip cut into
// its hops.
func (r *report) traceMarkdown(b *strings.Builder) {
	t := r.Trace
	fmt.Fprintf(b, "## Where a sandbox ↔ sandbox round trip's time goes (one traced run)\n\n")
	if t.RoundTrips == 0 {
		fmt.Fprintf(b, "Not traced: %s.\n\n", t.Error)
		return
	}
	fmt.Fprintf(b, "The netstack client's 64 B round trips to the echo sandbox through the agent, each cut where the three processes recorded (hoptrace) their links' receives and transmits and the applications' writes, from one write of the client to its next. Traced p50 %.1f µs, %.1f µs untraced just before; %d round trips (%d missing a point, left out), their hops summing to %.1f µs on average. \"Woken\" is the share of round trips in which a receive loop of the process that takes the frame (the agent has one per link) slept on its eventfd and was woken during the hop.\n\n",
		t.TracedP50us, t.UntracedP50us, t.RoundTrips, t.Incomplete, t.MeanUs)
	fmt.Fprintf(b, "| hop | median µs | mean µs | share of the mean | woken |\n|---|---:|---:|---:|---:|\n")
	for _, h := range t.Hops {
		woken := ""
		if h.Woken != nil {
			woken = fmt.Sprintf("%.0f%%", 100**h.Woken)
		}
		fmt.Fprintf(b, "| %s | %.1f | %.1f | %.0f%% | %s |\n", h.Name, h.MedianUs, h.MeanUs, 100*h.MeanUs/t.MeanUs, woken)
	}
	fmt.Fprintf(b, "\nReceive loops' sleeps on their eventfd per round trip: client %.2f, agent %.2f, echo sandbox %.2f.\n\n",
		t.Sleeps[roleClient], t.Sleeps[roleAgent], t.Sleeps[roleEcho])
}
