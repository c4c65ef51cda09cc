// Package linkspec holds the rules every side of a link agrees on: the CNI
// plugin, the agent, its router and the link endpoints. A pod link is named
// by its Key (container ID, interface name); an interface name passes
// CheckIfName; an MTU lies within the bounds of its link kind (MinMTU,
// MinShmMTU, MinNodeMTU, MaxMTU), checked with CheckMTU.
//
//	if err := linkspec.CheckMTU(cfg.ShmMTU, linkspec.MinShmMTU); err != nil {
//		return fmt.Errorf("shmMtu: %w", err)
//	}
//
// It imports nothing but the standard library, so that the CNI binary and
// a sandbox's link can use it without the netstack.
package linkspec
