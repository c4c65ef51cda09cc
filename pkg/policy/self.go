package policy

import (
	"net/netip"
	"sync"
	"time"
)

// A pod's connection to a Service that picks the pod itself.
//
// The host translates the Service address to the pod's own, and kube-proxy
// masquerades the connection to the node's address on the way back (a pod
// would drop a packet from its own address). So it reaches the pod from
// the node gateway, which is always let in: the pod's ingress rules would
// never see it. Kubernetes asks that they do (its NetworkPolicy tests probe
// every pod from itself through its Service, and expect a pod whose policy
// denies it to be refused). Other plugins judge it before the masquerade,
// in the host; here the router sees it only after.
//
// So the enforcer remembers, for a short while, the connections an
// isolated pod opens to a Service address: a TCP SYN by its sequence
// number, which the host's translations keep (they change addresses and
// ports only, and kube-proxy's masquerade may pick any source port), a UDP
// or SCTP flow by its source port (kept unless the host must change it).
// A connection that opens from a node address to that pod and matches one
// (a SYN with the same sequence number, a datagram from the same port) is
// the pod's own: it is judged as a connection from the pod to itself, and
// refused when the pod's rules deny that. A kubelet probe cannot match but
// by guessing the sequence number the pod chose. Only the opening is
// judged so: an established connection carries on as node traffic.

// selfWindow is how long an opening to a Service waits for its match:
// longer than TCP's first SYN retransmissions (1 s, 3 s).
const selfWindow = 10 * time.Second

// selfBounds: openings remembered at once, all pods together and per pod.
// A pod past its share has its openings unremembered, which harms only
// itself (its own Service connections pass as node traffic).
const (
	selfMax      = 1 << 14
	selfPodShare = 1 << 10
)

type selfKey struct {
	pod   netip.Addr
	proto uint8
	// id is a TCP SYN's sequence number, a datagram's source port.
	id uint32
}

// selfOpens is the enforcer's memory of openings to Services. Safe for
// concurrent use.
type selfOpens struct {
	mu sync.Mutex
	// until maps an opening to when it is forgotten. Guarded by mu.
	until map[selfKey]time.Time
	// perPod counts the openings of each pod. Guarded by mu.
	perPod map[netip.Addr]int
	// now is time.Now, but in tests.
	now func() time.Time
}

func newSelfOpens() *selfOpens {
	return &selfOpens{until: map[selfKey]time.Time{}, perPod: map[netip.Addr]int{}, now: time.Now}
}

// opening returns the key of f when it opens a connection (a TCP SYN
// without ACK, a UDP or SCTP datagram) from pod.
func opening(f *Flow, pod netip.Addr) (selfKey, bool) {
	switch {
	case f.Proto == ProtoTCP && f.TCPFlags&(tcpSyn|tcpAck) == tcpSyn:
		return selfKey{pod: pod, proto: f.Proto, id: f.Seq}, true
	case f.Proto == ProtoUDP || f.Proto == ProtoSCTP:
		return selfKey{pod: pod, proto: f.Proto, id: uint32(f.SrcPort)}, true
	}
	return selfKey{}, false
}

// note remembers f, a local pod's packet to a Service address, when it
// opens a connection.
func (o *selfOpens) note(f *Flow) {
	k, ok := opening(f, f.Src)
	if !ok {
		return
	}
	now := o.now()
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.until[k]; !ok {
		o.sweepLocked(now)
		if len(o.until) >= selfMax || o.perPod[k.pod] >= selfPodShare {
			return
		}
		o.perPod[k.pod]++
	}
	o.until[k] = now.Add(selfWindow)
}

// sweepLocked forgets what expired, looking at a few entries.
//
// +checklocks:o.mu
func (o *selfOpens) sweepLocked(now time.Time) {
	n := 0
	for k, t := range o.until {
		if n++; n > 8 {
			return
		}
		if now.After(t) {
			o.forgetLocked(k)
		}
	}
}

// +checklocks:o.mu
func (o *selfOpens) forgetLocked(k selfKey) {
	delete(o.until, k)
	if o.perPod[k.pod]--; o.perPod[k.pod] <= 0 {
		delete(o.perPod, k.pod)
	}
}

// own reports whether f, a packet from a node address to the local pod
// f.Dst, opens a connection that pod opened to a Service.
func (o *selfOpens) own(f *Flow) bool {
	k, ok := opening(f, f.Dst)
	if !ok {
		return false
	}
	now := o.now()
	o.mu.Lock()
	defer o.mu.Unlock()
	t, ok := o.until[k]
	if ok && now.After(t) {
		o.forgetLocked(k)
		return false
	}
	return ok
}

// expire forgets every opening past its window.
func (o *selfOpens) expire() {
	now := o.now()
	o.mu.Lock()
	defer o.mu.Unlock()
	for k, t := range o.until {
		if now.After(t) {
			o.forgetLocked(k)
		}
	}
}
