// Package ipam is the node agent's built-in address allocator: it hands each
// pod link one address (a /32 or /128) per configured family from the node's
// pod CIDRs and keeps the allocations on disk so that they survive agent
// restarts and crashes.
//
// # Use
//
//	a, err := ipam.Open(stateDir, []netip.Prefix{v4CIDR, v6CIDR}, ipam.Options{Logger: log})
//	if err != nil { ... }
//	defer a.Close()
//	addrs, err := a.Allocate(ipam.Owner{ContainerID: cid, IfName: "eth0"}) // v4 first
//	...
//	err = a.Release(owner)                  // CNI DEL; idempotent
//	released, err := a.ReleaseExcept(valid) // CNI GC
//
// Open takes an exclusive flock on the directory (a second Open of the same
// directory, from this or another process, fails with ErrLocked) until Close.
// All methods are safe for concurrent use.
//
// # Ranges
//
// At most one range per address family (as Kubernetes' Node.spec.podCIDRs):
// IPv4-only, IPv6-only or dual-stack. Ranges must be canonical (no host bits
// set), must not overlap, and must not be IPv4-mapped IPv6 prefixes. In every
// range these addresses are never handed out:
//
//   - the network address (for IPv6 this is also the subnet-router anycast
//     address, RFC 4291 section 2.6.1);
//   - the first address after it, reserved as the node's gateway address on the
//     uplink (see Gateway and Gateways);
//   - for IPv4, the broadcast address (the last address).
//
// So an IPv4 range needs at least a /30 (one pod address) and an IPv6 range
// at least a /126 (two pod addresses); /31, /32, /127 and /128 are rejected.
// The RFC 2526 reserved subnet anycast addresses (the top 128 of a range) are
// not excluded, as in the reference host-local plugin.
//
// Addresses are handed out sequentially from a per-range cursor that remembers
// the last address reserved (like host-local's last_reserved_ip), so a
// released address is reused only after the cursor has gone round the range.
// When every usable address of a range is taken, Allocate fails with an error
// wrapping ErrExhausted and naming the range.
//
// # On-disk format
//
// The directory holds three files:
//
//   - "lock": empty, flocked (LOCK_EX) while an Allocator is open;
//   - "state.json": the whole state, described below;
//   - "state.json.tmp": the next state while it is being written; Open
//     removes a leftover one.
//
// state.json is one JSON object, version 1:
//
//	{
//		"version": 1,
//		"cursors": {"10.244.1.0/24": "10.244.1.7", "fd00:10:244:1::/64": "fd00:10:244:1::7"},
//		"allocations": [
//			{"containerID": "3f2a", "ifName": "eth0", "addrs": ["10.244.1.7", "fd00:10:244:1::7"]}
//		]
//	}
//
// "cursors" maps each range to the last address reserved in it.
// "allocations" is sorted by container ID, then interface name; each holds
// one address per family, IPv4 first. Unknown fields, trailing data,
// duplicate owners and duplicate addresses are errors.
//
// Every change rewrites state.json as a whole: the new state is written to
// state.json.tmp, fsynced, renamed over state.json and the directory is
// fsynced, all before the call returns. A crash at any point therefore leaves
// either the old or the new state, never a mix of them. A missing state.json
// is an empty state; an unreadable or invalid one makes Open fail with an
// error naming the file, so allocations are never dropped silently.
//
// Allocations found on disk whose addresses lie outside the configured ranges
// (the node's CIDRs changed) are kept, logged, returned by Get and List and
// released as usual; Allocate returns them unchanged for their owner.
package ipam
