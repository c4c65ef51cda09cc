package endpoint

import "gvisor.dev/gvisor/pkg/tcpip/stack"

// AppendSlices appends the slices holding pkt's bytes, headers included, to
// dst (without allocating when dst has room for them), and returns them
// with their total length. Both link kinds write a packet from them.
func AppendSlices(dst [][]byte, pkt *stack.PacketBuffer) ([][]byte, int) {
	vl, off := pkt.AsViewList()
	total := 0
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		b = b[off:]
		off = 0
		dst = append(dst, b)
		total += len(b)
	}
	return dst, total
}
