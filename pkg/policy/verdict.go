package policy

import "net/netip"

// decide returns nil when a connection t (ports: it has ports to match)
// may open under s, or the pod whose policy denies it and in which
// direction. extraNodes are node addresses beside the snapshot's.
func (s *Snapshot) decide(t *Tuple, ports bool, nodeAddrs []netip.Addr) (*Pod, Direction) {
	if sp := s.source(t); sp != nil {
		if tb := sp.tables[Egress]; tb != nil && !s.service(t.Dst) && !tb.Allows(t.Dst, t.Proto, t.DstPort, ports) {
			return sp, Egress
		}
	}
	if dp := s.pods[t.Dst]; dp != nil {
		if tb := dp.tables[Ingress]; tb != nil && !s.node(t.Src, nodeAddrs) && !tb.Allows(t.Src, t.Proto, t.DstPort, ports) {
			return dp, Ingress
		}
	}
	return nil, 0
}

// source returns the pod whose egress rules t's source meets here: a local
// pod's, or for a connection to a local pod, a pod of another node's that
// policy isolates for egress. Its own node judged it already, unless the
// connection went to a Service address, which its host translated after
// that node's router: here is the first place that sees the pod it
// reaches. (Judging a direct connection twice gives the same answer.)
func (s *Snapshot) source(t *Tuple) *Pod {
	if sp := s.pods[t.Src]; sp != nil {
		return sp
	}
	if s.pods[t.Dst] != nil {
		return s.remote[t.Src]
	}
	return nil
}

// remoteIsolated reports whether a or b is a pod of another node that
// policy isolates for egress: a connection between it and a local pod is
// tracked, so that the replies to the local pod's connection pass.
func (s *Snapshot) remoteIsolated(a, b netip.Addr) bool {
	if len(s.remote) == 0 {
		return false
	}
	return s.remote[a] != nil || s.remote[b] != nil
}

// Allows reports whether a connection from src to dst of proto (to port
// dst port, for TCP, UDP and SCTP) may open under s: the stateless verdict,
// for tests and operators.
func (s *Snapshot) Allows(src, dst netip.Addr, proto uint8, port uint16) bool {
	ports := proto == ProtoTCP || proto == ProtoUDP || proto == ProtoSCTP
	by, _ := s.decide(&Tuple{Src: src, Dst: dst, Proto: proto, DstPort: port}, ports, nil)
	return by == nil
}

// node reports whether a is one of the node's addresses (the snapshot's
// or extra).
func (s *Snapshot) node(a netip.Addr, extra []netip.Addr) bool {
	for _, n := range extra {
		if n == a {
			return true
		}
	}
	for _, n := range s.nodeAddrs {
		if n == a {
			return true
		}
	}
	return false
}

// service reports whether a is a Service address: see the package doc.
func (s *Snapshot) service(a netip.Addr) bool {
	for _, p := range s.services {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
