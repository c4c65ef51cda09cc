package queue

// PeerView maps every region of q without checks, as the peer (or a test
// playing a hostile peer) sees them: data, TX ring, RX ring, shared page.
// It returns an unmap function. It exists for tests of the queue's users.
func PeerView(q QueueFDs) (data, txPipe, rxPipe, shared []byte, unmap func(), err error) {
	m, err := mapQueue(q, MapOptions{})
	if err != nil {
		return nil, nil, nil, nil, nil, err
	}
	return m.data, m.txPipe, m.rxPipe, m.shared, m.unmap, nil
}
