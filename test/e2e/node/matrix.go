package node

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Check is one cell of a connectivity matrix: a verified transfer from Src
// to Dst over one family.
type Check struct {
	Src, Dst *Peer
	V6       bool
	Transfer Transfer
	// Err is why the check failed: the transfer failed, or the receiver
	// saw another source address than ExpectedSource.
	Err error
}

// Matrix runs a verified transfer of size bytes from every source to every
// destination but itself, over IPv4 and IPv6 (host -> outside included: it
// checks the box's own wiring), and checks the source address
// each receiver saw. Checks run one at a time, grouped by source so that
// each sandbox switches between serving and sending as little as possible.
// After ctx ends the remaining checks fail at once.
func (n *Node) Matrix(ctx context.Context, srcs, dsts []*Peer, size int64) []Check {
	var out []Check
	for _, src := range srcs {
		for _, dst := range dsts {
			if src == dst || (src.Pod != nil && src.Pod == dst.Pod) || src.Kind == dst.Kind && (src.Kind == PeerHost || src.Kind == PeerOutside) {
				continue
			}
			for _, v6 := range []bool{false, true} {
				c := Check{Src: src, Dst: dst, V6: v6}
				c.Transfer, c.Err = n.Transfer(ctx, src, dst, v6, size)
				if c.Err == nil {
					if want := n.ExpectedSource(src, dst, v6); c.Transfer.From != want {
						c.Err = fmt.Errorf("%s -> %s %s: the receiver saw source %s, want %s",
							src.Name, dst.Name, family(v6), c.Transfer.From, want)
					}
				}
				out = append(out, c)
			}
		}
	}
	return out
}

// PrintMatrix writes checks as a table: a row per source, a column per
// destination (in the order given), each cell the IPv4 and IPv6 outcome
// ("ok/ok", "ok/FAIL", "-" for no check), then every failure's reason.
func PrintMatrix(w io.Writer, srcs, dsts []*Peer, checks []Check) {
	cell := map[[2]*Peer][2]string{}
	for _, c := range checks {
		k := [2]*Peer{c.Src, c.Dst}
		v := cell[k]
		i := 0
		if c.V6 {
			i = 1
		}
		v[i] = "ok"
		if c.Err != nil {
			v[i] = "FAIL"
		}
		cell[k] = v
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := []string{"from \\ to"}
	for _, d := range dsts {
		head = append(head, fmt.Sprintf("%s (%s)", d.Name, d.Kind))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t"))
	for _, s := range srcs {
		row := []string{fmt.Sprintf("%s (%s)", s.Name, s.Kind)}
		for _, d := range dsts {
			v, ok := cell[[2]*Peer{s, d}]
			if !ok {
				row = append(row, "-")
				continue
			}
			row = append(row, v[0]+"/"+v[1])
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()
	for _, c := range checks {
		if c.Err != nil {
			fmt.Fprintf(w, "FAIL %v\n", c.Err)
		}
	}
}
