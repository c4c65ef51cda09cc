package cni

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"
)

// About is what the binary prints on stderr when run without CNI_COMMAND.
const About = "CNI plugin shm-cni: shared-memory and TAP pod links to the shm-agent netstack router"

// DefaultTimeout bounds one CNI command (agent calls and IPAM delegation).
const DefaultTimeout = 60 * time.Second

// cleanupTimeout bounds the rollback of a failed ADD, which runs on a
// context of its own so that it still runs when the command's ran out.
const cleanupTimeout = 20 * time.Second

// VersionInfo returns the CNI specification versions the plugin supports:
// 1.0.0 and later (STATUS and GC need a 1.1.0 config).
func VersionInfo() version.PluginInfo { return version.VersionsStartingFrom("1.0.0") }

// Plugin runs the CNI commands. The zero value is ready to use and writes to
// the process's stdout and stderr.
type Plugin struct {
	// Immutable once a command runs.

	// Stdout receives the ADD result. nil means os.Stdout, read when the
	// command runs.
	Stdout io.Writer
	// Stderr receives the logs when the config names no logFile. nil
	// means os.Stderr, read when the command runs.
	Stderr io.Writer
	// Timeout bounds one command; 0 means DefaultTimeout.
	Timeout time.Duration
}

// Funcs returns the plugin's commands for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, Status: p.Status, GC: p.GC}
}

// Main runs one CNI command the way the runtime asks for it (environment
// and stdin) and returns the process exit code. An error is printed as CNI
// error JSON on stdout. cmd/shm-cni is os.Exit(cni.Main()).
func Main() int {
	p := &Plugin{}
	if e := skel.PluginMainFuncsWithError(p.Funcs(), VersionInfo(), About); e != nil {
		if err := e.Print(); err != nil {
			fmt.Fprintf(os.Stderr, "shm-cni: write error result: %v\n", err)
		}
		return 1
	}
	return 0
}

// call is the state of one command.
type call struct {
	// All immutable after begin.
	ctx     context.Context
	cancel  context.CancelFunc
	conf    *Config
	log     *slog.Logger
	logFile *os.File // nil when logging to stderr
}

// begin parses the config and sets up the command's context and logger,
// scoped with the command, container ID, netns and interface name.
func (p *Plugin) begin(cmd string, args *skel.CmdArgs) (*call, error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return nil, err
	}
	c := &call{conf: conf}
	var w io.Writer = p.Stderr
	if w == nil {
		w = os.Stderr
	}
	var fileErr error
	if conf.LogFile != "" {
		f, err := os.OpenFile(conf.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err == nil {
			c.logFile, w = f, f
		} else {
			fileErr = err
		}
	}
	level, _ := parseLevel(conf.LogLevel) // Validate checked it.
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})).With("plugin", "shm-cni", "cmd", cmd, "network", conf.Name)
	if args.ContainerID != "" {
		log = log.With("containerID", args.ContainerID)
	}
	if args.Netns != "" {
		log = log.With("netns", args.Netns)
	}
	if args.IfName != "" {
		log = log.With("ifName", args.IfName)
	}
	if fileErr != nil {
		// Logging must not make a pod fail: fall back to stderr.
		log.Warn("cannot open logFile, logging to stderr", "logFile", conf.LogFile, "err", fileErr)
	}
	c.log = log
	timeout := p.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	c.ctx, c.cancel = context.WithTimeout(context.Background(), timeout)
	return c, nil
}

// end releases what begin set up.
func (c *call) end() {
	c.cancel()
	if c.logFile != nil {
		c.logFile.Close()
	}
}

// fail logs a command's error and returns it as the runtime gets it. err
// must not be nil.
func (c *call) fail(err error) error {
	e := toCNI(err)
	c.log.Error("command failed", "code", e.Code, "err", e.Error())
	return e
}

// stdout returns where the result goes.
func (p *Plugin) stdout() io.Writer {
	if p.Stdout != nil {
		return p.Stdout
	}
	return os.Stdout
}
