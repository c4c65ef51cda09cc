// Package node is a Kubernetes node in a box for shm-cni's end-to-end tests
// and its demo: the real binaries, real network namespaces, real traffic.
//
// A Node is a fresh "host" network namespace running the real shm-agent
// process (its uplink TUN, routes and nftables live there, never in the
// machine's own namespace), an "outside" namespace joined to the host by a
// veth pair (192.0.2.0/24, 2001:db8:2::/64) to play the world beyond the
// node, and pods: one fresh network namespace each, networked by the real
// shm-cni binary run through libcni, the library container runtimes use,
// with a 1.1.0 conflist. Kernel-stack pods ("tap") get sockets opened inside
// their namespace; sandbox pods ("shm") run the sandbox workload program
// (test/e2e/sandbox) on the socketPath of their CNI result.
//
// # Use
//
//	bins, err := node.Build(ctx, binDir, node.BuildOptions{})  // once
//	n, err := node.New(ctx, node.Options{Binaries: bins, Logger: log})
//	defer n.Close()                                 // kills, deletes, removes everything
//	k1, err := n.AddPod(ctx, "k1", node.KindTap)   // CNI ADD in a fresh netns
//	s1, err := n.AddPod(ctx, "s1", node.KindShm)
//	tr, err := n.Transfer(ctx, n.PodPeer(k1), n.PodPeer(s1), false, 100<<20)
//	checks := n.Matrix(ctx, sources, destinations, 1<<20)
//
// Every TCP check is a verified transfer: the sender writes a known byte
// pattern, the receiver checks every byte and reports the source address it
// saw (so masquerade and its absence are checked too); the sender waits for
// the receiver to close, so nothing is left in flight.
//
// Everything a Node makes (processes, namespaces, files) is released by
// Close, which is safe to call after any failure and more than once. The
// CNI binary runs in the host namespace, as under a container runtime; the
// agent and sandboxes are started in their namespaces from a thread locked
// into them, and die with the process that started them (PR_SET_PDEATHSIG).
// Everything needs root.
package node
