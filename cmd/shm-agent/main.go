// Command shm-agent is the shm-cni node agent; see package agent.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/shm-cni/shm-cni/pkg/agent"
)

func main() { os.Exit(run()) }

func run() int {
	cfg := agent.DefaultConfig()
	cfg.NodeName = os.Getenv("NODE_NAME")
	cfg.RegisterFlags(flag.CommandLine)
	flag.Parse()
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	kc, err := agent.ConnectKube(ctx, &cfg, log)
	if err != nil && ctx.Err() != nil {
		return 0 // stopped while waiting for the Node's pod CIDRs
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "shm-agent:", err)
		return 2
	}
	a, err := agent.New(cfg, log, agent.WithKubeClient(kc))
	if err != nil {
		fmt.Fprintln(os.Stderr, "shm-agent:", err)
		return 2
	}
	if err := a.Run(ctx); err != nil {
		log.Error("shm-agent failed", "err", err)
		return 1
	}
	return 0
}
