package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// The plot beside bench.md: every ratio to the veth pair at a glance, one
// horizontal bar per case in three panels (throughput with one stream,
// CPU per GiB with one stream, 64 B round trip p50). Bars are on a log
// scale centred on 1x (the veth pair) so that 0.1x and 10x are as far from
// it; a bar's colour says whether it is on the good side of 1x.

// plotBar is one bar: a label, its ratio and whether higher is better.
type plotBar struct {
	label        string
	ratio        float64
	higherBetter bool
}

// plotPanel is a titled group of bars.
type plotPanel struct {
	title string
	bars  []plotBar
}

// panels returns what the plot shows of r.
func (r *report) panels() []plotPanel {
	var tput, cpu, rtt plotPanel
	tput.title = "TCP throughput, 1 stream (higher is better)"
	cpu.title = "machine CPU seconds per GiB, 1 stream (lower is better)"
	rtt.title = "64 B round trip p50 (lower is better)"
	for _, t := range r.Throughput {
		if t.Streams != 1 || t.Median == 0 {
			continue
		}
		label := t.Case
		if t.Tool != "iperf3" {
			label += " (" + t.Tool + ")"
		}
		tput.bars = append(tput.bars, plotBar{label, t.Ratio, true})
		if t.CPURatio > 0 {
			cpu.bars = append(cpu.bars, plotBar{label, t.CPURatio, false})
		}
	}
	for _, l := range r.Latency {
		if l.MedianP50 > 0 {
			rtt.bars = append(rtt.bars, plotBar{l.Case + " (" + l.Tool + ")", l.RatioP50, false})
		}
	}
	var out []plotPanel
	for _, p := range []plotPanel{tput, cpu, rtt} {
		if len(p.bars) > 0 {
			out = append(out, p)
		}
	}
	return out
}

// svg draws the panels as an SVG document.
func (r *report) svg() string {
	const (
		width   = 900
		labelW  = 380
		barH    = 16
		gap     = 6
		titleH  = 28
		decades = 2.0 // the axis spans 10^-2 .. 10^2
	)
	plotW := float64(width - labelW - 30)
	x := func(ratio float64) float64 {
		l := math.Log10(math.Max(ratio, 1e-3))
		l = math.Max(-decades, math.Min(decades, l))
		return float64(labelW) + (l+decades)/(2*decades)*plotW
	}
	var b strings.Builder
	y := 40
	var body strings.Builder
	for _, p := range r.panels() {
		fmt.Fprintf(&body, `<text x="10" y="%d" font-weight="bold">%s</text>`+"\n", y+18, html.EscapeString(p.title))
		y += titleH
		top := y
		for _, bar := range p.bars {
			good := bar.ratio >= 1
			if !bar.higherBetter {
				good = bar.ratio <= 1
			}
			color := "#c0392b"
			if good {
				color = "#27ae60"
			}
			x0, x1 := x(1), x(bar.ratio)
			if x1 < x0 {
				x0, x1 = x1, x0
			}
			fmt.Fprintf(&body, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", labelW-8, y+barH-3, html.EscapeString(bar.label))
			fmt.Fprintf(&body, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", x0, y, math.Max(x1-x0, 1), barH, color)
			fmt.Fprintf(&body, `<text x="%.1f" y="%d" font-size="11">%.2fx</text>`+"\n", x1+4, y+barH-4, bar.ratio)
			y += barH + gap
		}
		fmt.Fprintf(&body, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>`+"\n", x(1), top-4, x(1), y)
		y += 10
	}
	// The axis: one tick per decade.
	for d := -decades; d <= decades; d++ {
		v := math.Pow(10, d)
		fmt.Fprintf(&body, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#bbb" stroke-dasharray="2,3"/>`+"\n", x(v), 34, x(v), y)
		fmt.Fprintf(&body, `<text x="%.1f" y="%d" text-anchor="middle" font-size="11">%gx</text>`+"\n", x(v), y+14, v)
	}
	y += 24
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, y)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="22" font-size="15" font-weight="bold">shm-cni: ratio to a veth pair in the same run (%s, %d CPUs, load %s before)</text>`+"\n",
		html.EscapeString(r.Started), r.Machine.NProc, html.EscapeString(r.LoadBefore))
	b.WriteString(body.String())
	b.WriteString("</svg>\n")
	return b.String()
}
