// Package cni is the shm-cni CNI plugin: the commands ADD, DEL, CHECK,
// STATUS, GC and VERSION of CNI specification 1.1.0, run by container
// runtimes for every pod.
//
// The plugin owns no state. ADD creates the pod's link and hands it to the
// node agent (shm-agent) over the agent socket (package agentapi), then
// configures the pod's network namespace from the agent's answer:
//
//   - kind "tap" (the default, kernel-stack pods): a persistent TAP device
//     named CNI_IFNAME in the pod netns, opened with a virtio-net header and
//     offloads; its fd goes to the agent, which drives it;
//   - kind "veth" (kernel-stack pods the host's kernel routes): a veth
//     pair, CNI_IFNAME in the pod netns and linkspec.HostVethName in the
//     host's; the agent routes to its host side;
//   - kind "shm" (sandboxed pods with a userspace stack): a shared-memory
//     queue pair whose 10 fds go to the agent, and a placeholder dummy
//     interface in the pod netns carrying the same addresses, routes and
//     MTU, for runtimes that read the netns. The result's interface has
//     socketPath, the agent's per-attachment socket the sandbox dials; the
//     placeholder's alias names it too ("sharedmem:<socketPath>", see
//     AttachSocketAliasPrefix), for runtimes that find their link there.
//
// In every case the pod gets its addresses as /32 and /128, an on-link
// route to 169.254.1.1 and default routes via 169.254.1.1 and fe80::1 (or
// what the agent answers), and permanent neighbour entries for the gateways.
//
// The config is one plugin entry of a conflist (see Config):
//
//	{
//	  "cniVersion": "1.1.0", "name": "pods", "type": "shm-cni",
//	  "kind": "tap", "mtu": 1500, "shmMtu": 65000,
//	  "agentSocket": "/run/shm-cni/agent.sock",
//	  "queue": {"dataSize": 1048576, "pipeSize": 65536, "bufferSize": 2048},
//	  "ipam": {"type": "host-local", ...},
//	  "logFile": "/var/log/shm-cni.log", "logLevel": "info"
//	}
//
// "mtu" is the MTU of tap and veth links; "shmMtu" the one of shm links, which the
// agent chooses when it is left out (its --shm-mtu).
//
// Without "ipam" the agent allocates the addresses; with it, the named IPAM
// plugin does and the agent gets them. A pod picks its kind with CNI_ARGS
// SHM_CNI_KIND, args.cni.kind, or the pod annotation shm-cni.io/kind.
//
// A binary is one line (cmd/shm-cni):
//
//	func main() { os.Exit(cni.Main()) }
//
// Tests and other programs can run the commands in-process through Plugin,
// whose methods have the skel.CNIFuncs signatures. Errors carry CNI codes
// (agentapi's Code constants, the one block of them); the result goes to
// stdout, logs to stderr or the config's logFile.
package cni
