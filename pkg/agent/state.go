package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/shm-cni/shm-cni/pkg/agentapi"
	"github.com/shm-cni/shm-cni/pkg/linkspec"
	"github.com/shm-cni/shm-cni/pkg/queue"
	"github.com/shm-cni/shm-cni/pkg/router"
)

// recordVersion is the version of the attachment files.
const recordVersion = 1

// attachmentsDir is the subdirectory of the state directory with one file
// per attachment; ipamDir the IPAM allocator's.
const (
	attachmentsDir = "attachments"
	ipamDir        = "ipam"
	recordSuffix   = ".json"
	tmpSuffix      = ".tmp"
)

// record is an attachment as persisted, everything needed to re-adopt or
// release it after an agent restart. It is immutable once written.
type record struct {
	Version     int    `json:"version"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	Kind        string `json:"kind"`
	Netns       string `json:"netns"`
	Network     string `json:"network"`
	PodNS       string `json:"podNamespace,omitempty"`
	PodName     string `json:"podName,omitempty"`
	// Addrs are the pod's addresses, IPv4 first.
	Addrs []netip.Addr `json:"addrs"`
	// Allocated says the addresses come from the agent's IPAM (not from a
	// delegated IPAM plugin), so the agent releases them.
	Allocated bool `json:"allocated"`
	MTU       int  `json:"mtu"`
	// PodMAC is the pod side's MAC.
	PodMAC string `json:"podMAC"`
	// Queue are a shm link's queue sizes.
	Queue *queue.Sizes `json:"queue,omitempty"`
	// TAPName is a tap link's device name in the pod netns, VnetHdr whether
	// it was opened with a virtio-net header.
	TAPName string `json:"tapName,omitempty"`
	VnetHdr bool   `json:"vnetHdr,omitempty"`
	// Bandwidth is the pod's bandwidth limit, nil when it has none: kept
	// so that the limit holds across agent restarts.
	Bandwidth *linkspec.Bandwidth `json:"bandwidth,omitempty"`
}

// routerLink is the router's view of the record's link.
func (r *record) routerLink() router.Link {
	l := router.Link{Addrs: r.Addrs, PodMAC: macOf(r.PodMAC), GatewayMAC: GatewayMAC}
	if r.Bandwidth != nil {
		l.Bandwidth = *r.Bandwidth
	}
	return l
}

func (r *record) key() linkspec.Key {
	return linkspec.Key{ContainerID: r.ContainerID, IfName: r.IfName}
}

// recordFile is k's record file name. ':' appears in neither a container
// ID nor an interface name (agentapi validates both), so names never
// collide.
func recordFile(k linkspec.Key) string { return k.ContainerID + ":" + k.IfName + recordSuffix }

// validate checks a record read from disk.
func (r *record) validate() error {
	var errs []error
	if r.Version != recordVersion {
		errs = append(errs, fmt.Errorf("version %d, want %d", r.Version, recordVersion))
	}
	// The request validation covers IDs, names, netns and kind.
	req := agentapi.Request{Version: agentapi.Version, Op: agentapi.OpAttach, Attach: &agentapi.AttachRequest{
		ContainerID: r.ContainerID, IfName: r.IfName, Netns: r.Netns, Network: r.Network, Kind: r.Kind,
		MTU: r.MTU, PodNamespace: r.PodNS, PodName: r.PodName, MAC: r.PodMAC, Bandwidth: r.Bandwidth,
	}}
	if r.Queue != nil {
		req.Attach.Queue = &agentapi.QueueSizes{DataSize: r.Queue.DataSize, PipeSize: r.Queue.PipeSize, BufferSize: r.Queue.BufferSize}
	}
	if err := req.Validate(); err != nil {
		errs = append(errs, err)
	}
	if r.Queue != nil {
		if err := r.Queue.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(r.Addrs) == 0 {
		errs = append(errs, errors.New("no address"))
	}
	if r.PodMAC == "" {
		errs = append(errs, errors.New("no pod MAC"))
	}
	if r.Kind == agentapi.KindTap && r.TAPName == "" {
		errs = append(errs, errors.New("tap attachment without a device name"))
	}
	return errors.Join(errs...)
}

// store keeps the attachment records of a state directory. Its methods are
// not synchronised: the agent calls them under its operation lock, except
// write, which an attach runs outside it (each record is its own file).
type store struct {
	dir string // <state-dir>/attachments; immutable
}

// openStore creates the attachments directory if needed and removes
// temporary files a crash left behind.
func openStore(stateDir string) (*store, error) {
	dir := filepath.Join(stateDir, attachmentsDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open attachment store %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("open attachment store %s: %w", dir, err)
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), tmpSuffix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("open attachment store %s: %w", dir, err)
			}
		}
	}
	return &store{dir: dir}, nil
}

// put writes r atomically: a temporary file, fsynced, renamed over the
// record, and the directory fsynced. A crash leaves the old record or the
// new one.
func (s *store) put(r *record) error {
	b, err := encodeRecord(r)
	if err != nil {
		return err
	}
	return s.write(r.key(), b)
}

// encodeRecord returns r as put writes it.
func encodeRecord(r *record) ([]byte, error) {
	b, err := json.MarshalIndent(r, "", "\t")
	if err != nil {
		return nil, fmt.Errorf("write attachment %s: %w", r.key(), err)
	}
	return b, nil
}

// write is put of a record encoded by encodeRecord. Writes of different
// records may run at once: their fsyncs then share the file system's
// journal commits.
func (s *store) write(k linkspec.Key, b []byte) error {
	name := filepath.Join(s.dir, recordFile(k))
	tmp := name + tmpSuffix
	if err := writeSync(tmp, b); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write attachment %s: %w", k, err)
	}
	if err := os.Rename(tmp, name); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write attachment %s: %w", k, err)
	}
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("write attachment %s: %w", k, err)
	}
	return nil
}

// remove deletes k's record; a missing record is not an error.
func (s *store) remove(k linkspec.Key) error {
	if err := os.Remove(filepath.Join(s.dir, recordFile(k))); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove attachment %s: %w", k, err)
	}
	if err := syncDir(s.dir); err != nil {
		return fmt.Errorf("remove attachment %s: %w", k, err)
	}
	return nil
}

// load reads every record. A file that cannot be parsed is reported in
// bad (and left in place for an operator), not fatal.
func (s *store) load() (recs []*record, bad []error, err error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("load attachments: %w", err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() || !strings.HasSuffix(e.Name(), recordSuffix) {
			continue
		}
		p := filepath.Join(s.dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			bad = append(bad, fmt.Errorf("%s: %w", p, err))
			continue
		}
		r, err := parseRecord(b)
		if err == nil && recordFile(r.key()) != e.Name() {
			err = fmt.Errorf("holds attachment %s", r.key())
		}
		if err != nil {
			bad = append(bad, fmt.Errorf("%s: %w", p, err))
			continue
		}
		recs = append(recs, r)
	}
	return recs, bad, nil
}

// parseRecord decodes and validates one attachment file.
func parseRecord(b []byte) (*record, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r record
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("parse attachment: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("parse attachment: data after the JSON object")
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("parse attachment: %w", err)
	}
	return &r, nil
}

func writeSync(name string, b []byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
