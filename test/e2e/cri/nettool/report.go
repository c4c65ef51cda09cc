package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
)

// A raw line of the benchmark script, one per measurement:
//
//	network=tap pair=runsc-runc metric=tput streams=1 bytes=N seconds=S cpu_s=C agent_s=A sentry_s=G
//	network=tap pair=runsc-runc metric=rr p50_us=P p99_us=Q
//
// cpu_s is the whole machine's busy CPU time during the transfer (agent,
// sandboxes, kernel and anything else running); agent_s and sentry_s
// (optional) are the agent's and the runsc pods' Sentries' own part of it.

// row is one network and pair: every measurement of it.
type row struct {
	network, pair string
	gbps          map[int][]float64 // by streams
	cpuPerGiB     []float64         // 1 stream
	agentPerGiB   []float64         // 1 stream, the agent's own
	sentryPerGiB  []float64         // 1 stream, the Sentries' own
	p50, p99      []float64
}

// report reads raw lines and writes the markdown table: medians, and each
// median's ratio to the reference row's (-ref NETWORK/PAIR).
func report(args []string, in io.Reader, out io.Writer) error {
	fs := flag.NewFlagSet("report", flag.ContinueOnError)
	ref := fs.String("ref", "bridge/runc-runc", "the reference row, NETWORK/PAIR")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rows, order, err := parseRaw(in)
	if err != nil {
		return err
	}
	r0, ok := rows[*ref]
	if !ok {
		return fmt.Errorf("report: no reference row %s", *ref)
	}
	fmt.Fprintf(out, "Medians; in brackets the ratio to %s (throughput: higher is better; CPU and round trip: lower is better). CPU is the machine's busy time per GiB moved by one stream; the agent's and the runsc pods' Sentries' own parts of it follow.\n\n", *ref)
	fmt.Fprintln(out, "| network | pair | Gbit/s, 1 stream | Gbit/s, 4 streams | CPU-s per GiB (1 stream) | agent | Sentries | 64 B RTT p50 µs | p99 µs |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|")
	for _, k := range order {
		r := rows[k]
		cell := func(v, ref []float64, prec int) string {
			if len(v) == 0 {
				return "-"
			}
			m := median(v)
			s := strconv.FormatFloat(m, 'f', prec, 64)
			if len(ref) > 0 && median(ref) > 0 {
				s += fmt.Sprintf(" (%.2fx)", m/median(ref))
			}
			return s
		}
		fmt.Fprintf(out, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.network, r.pair,
			cell(r.gbps[1], r0.gbps[1], 2), cell(r.gbps[4], r0.gbps[4], 2),
			cell(r.cpuPerGiB, r0.cpuPerGiB, 2), cell(r.agentPerGiB, nil, 2), cell(r.sentryPerGiB, nil, 2),
			cell(r.p50, r0.p50, 0), cell(r.p99, r0.p99, 0))
	}
	return nil
}

// parseRaw groups raw lines by network/pair, keeping first-seen order.
func parseRaw(in io.Reader) (map[string]*row, []string, error) {
	rows := map[string]*row{}
	var order []string
	sc := bufio.NewScanner(in)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := fields(line)
		key := f["network"] + "/" + f["pair"]
		if f["network"] == "" || f["pair"] == "" {
			return nil, nil, fmt.Errorf("line %d: no network or pair: %q", n, line)
		}
		r := rows[key]
		if r == nil {
			r = &row{network: f["network"], pair: f["pair"], gbps: map[int][]float64{}}
			rows[key] = r
			order = append(order, key)
		}
		num := func(k string) (float64, error) {
			v, err := strconv.ParseFloat(f[k], 64)
			if err != nil {
				return 0, fmt.Errorf("line %d: %s: %w", n, k, err)
			}
			return v, nil
		}
		switch f["metric"] {
		case "tput":
			streams, err := strconv.Atoi(f["streams"])
			if err != nil {
				return nil, nil, fmt.Errorf("line %d: streams: %w", n, err)
			}
			bytes, err1 := num("bytes")
			secs, err2 := num("seconds")
			if err := errors.Join(err1, err2); err != nil {
				return nil, nil, err
			}
			if secs <= 0 {
				return nil, nil, fmt.Errorf("line %d: seconds %v", n, secs)
			}
			r.gbps[streams] = append(r.gbps[streams], bytes*8/secs/1e9)
			for _, c := range []struct {
				key string
				to  *[]float64
			}{{"cpu_s", &r.cpuPerGiB}, {"agent_s", &r.agentPerGiB}, {"sentry_s", &r.sentryPerGiB}} {
				if streams != 1 || f[c.key] == "" || bytes <= 0 {
					continue
				}
				cpu, err := num(c.key)
				if err != nil {
					return nil, nil, err
				}
				*c.to = append(*c.to, cpu/(bytes/(1<<30)))
			}
		case "rr":
			p50, err1 := num("p50_us")
			p99, err2 := num("p99_us")
			if err := errors.Join(err1, err2); err != nil {
				return nil, nil, err
			}
			r.p50 = append(r.p50, p50)
			r.p99 = append(r.p99, p99)
		default:
			return nil, nil, fmt.Errorf("line %d: unknown metric %q", n, f["metric"])
		}
	}
	return rows, order, sc.Err()
}

// median of v (not empty); v is reordered.
func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
