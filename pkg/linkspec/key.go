package linkspec

import "cmp"

// Key names one pod link: one interface of one container, as CNI names it
// (CNI_CONTAINERID, CNI_IFNAME). It is the agent's attachment key, the IPAM
// allocator's owner and the wire protocol's attachment.
type Key struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

// String returns "containerID/ifName".
func (k Key) String() string { return k.ContainerID + "/" + k.IfName }

// Compare orders keys by container ID, then interface name.
func (k Key) Compare(o Key) int {
	return cmp.Or(cmp.Compare(k.ContainerID, o.ContainerID), cmp.Compare(k.IfName, o.IfName))
}
