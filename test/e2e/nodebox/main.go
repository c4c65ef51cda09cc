// Command nodebox is shm-cni's node in a box: on one machine, without
// touching its network, it builds a node (a host network namespace running
// the real shm-agent, the real shm-cni binary run through libcni), three
// kernel-stack pods (two on veth links, the default kind, one on a TAP
// link) and two sandbox pods, and a namespace outside the node;
// it prints the connectivity matrix (a verified TCP transfer for every
// source and destination, IPv4 and IPv6) and one throughput figure per
// pair kind, then removes everything, also on Ctrl-C. Run it as root from
// the module:
//
//	go run ./test/e2e/nodebox [-size MiB] [-v]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/shm-cni/shm-cni/test/e2e/node"
)

func main() { os.Exit(run()) }

func run() int {
	size := flag.Int64("size", 256, "MiB of each throughput transfer")
	matrixSize := flag.Int64("matrix-size", 1, "MiB of each connectivity check")
	verbose := flag.Bool("v", false, "log every step of the harness")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "nodebox: needs root (network namespaces, TUN/TAP, nftables)")
		return 2
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := demo(ctx, log, *size<<20, *matrixSize<<20); err != nil {
		if errors.Is(ctx.Err(), context.Canceled) {
			fmt.Println("interrupted; cleaned up")
			return 130
		}
		fmt.Fprintln(os.Stderr, "nodebox:", err)
		return 1
	}
	return 0
}

// demo builds the node, runs the checks and prints them; every deferred
// cleanup runs on return, whatever happened.
func demo(ctx context.Context, log *slog.Logger, size, matrixSize int64) (err error) {
	start := time.Now()
	step := func(format string, args ...any) {
		fmt.Printf("[%5.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}

	binDir, err := os.MkdirTemp("", "nodebox-bin")
	if err != nil {
		return err
	}
	defer os.RemoveAll(binDir)
	step("building shm-cni, shm-agent and the sandbox program")
	bins, err := node.Build(ctx, binDir, node.BuildOptions{})
	if err != nil {
		return err
	}

	step("starting the node: host netns, shm-agent, outside netns (%s, %s)", node.Outside4, node.Outside6)
	n, err := node.New(ctx, node.Options{Binaries: bins, Logger: log})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			fmt.Printf("agent log (tail):\n%s\n", n.AgentLogTail(20))
		}
		if cerr := n.Close(); cerr != nil {
			fmt.Fprintln(os.Stderr, "nodebox: cleanup:", cerr)
		}
		step("cleaned up: agent and sandboxes stopped, namespaces and files removed")
	}()
	step("agent pid %d, pod CIDRs %s %s, uplink %s, node gateway %s %s",
		n.Agent().PID(), node.PodCIDR4, node.PodCIDR6, node.Uplink, n.Gateway4, n.Gateway6)

	var pods []*node.Pod
	for _, p := range []struct{ name, kind string }{
		{"k1", node.KindVeth}, {"k2", node.KindVeth}, {"t1", node.KindTap}, {"s1", node.KindShm}, {"s2", node.KindShm},
	} {
		pod, err := n.AddPod(ctx, p.name, p.kind)
		if err != nil {
			return err
		}
		pods = append(pods, pod)
		step("pod %s (%s): %s %s", pod.Name, kindName(pod.Kind), pod.Addr4, pod.Addr6)
	}
	k1, k2, t1 := n.PodPeer(pods[0]), n.PodPeer(pods[1]), n.PodPeer(pods[2])
	s1, s2 := n.PodPeer(pods[3]), n.PodPeer(pods[4])
	host, outside := n.HostPeer(), n.OutsidePeer()

	step("connectivity: a verified %d MiB TCP transfer per cell, IPv4/IPv6; receivers check every byte and the source address", matrixSize>>20)
	srcs := []*node.Peer{k1, k2, t1, s1, s2, host}
	dsts := []*node.Peer{k1, k2, t1, s1, s2, host, outside}
	checks := n.Matrix(ctx, srcs, dsts, matrixSize)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	fmt.Println()
	node.PrintMatrix(os.Stdout, srcs, dsts, checks)
	fmt.Println()
	failed := 0
	for _, c := range checks {
		if c.Err != nil {
			failed++
		}
	}

	step("throughput: one verified %d MiB TCP transfer per pair kind, IPv4", size>>20)
	fmt.Println()
	for _, p := range []struct {
		what     string
		src, dst *node.Peer
	}{
		{"kernel pod  -> kernel pod", k1, k2},
		{"tap pod     -> kernel pod", t1, k2},
		{"sandbox     -> sandbox", s1, s2},
		{"kernel pod  -> sandbox", k1, s2},
		{"sandbox     -> kernel pod", s1, k2},
		{"host        -> kernel pod", host, k1},
		{"host        -> tap pod", host, t1},
		{"host        -> sandbox", host, s1},
		{"kernel pod  -> outside", k2, outside},
		{"tap pod     -> outside", t1, outside},
		{"sandbox     -> outside", s2, outside},
	} {
		tr, err := n.Transfer(ctx, p.src, p.dst, false, size)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			failed++
			fmt.Printf("  %-26s FAIL %v\n", p.what, err)
			continue
		}
		fmt.Printf("  %-26s %7.1f MiB/s  (%s -> %s, seen as %s)\n", p.what, tr.MiBps(), p.src.Name, p.dst.Name, tr.From)
	}
	fmt.Println()
	if failed > 0 {
		return fmt.Errorf("%d checks failed", failed)
	}
	step("all checks passed")
	return nil
}

func kindName(kind string) string {
	if kind == node.KindShm {
		return "sandbox, shm"
	}
	return "kernel stack, " + kind
}
