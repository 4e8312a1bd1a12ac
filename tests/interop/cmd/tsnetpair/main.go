// Command tsnetpair starts pairs of tsnet nodes on one control server and, for each pair, checks
// a disco ping through DERP and a TCP transfer of -bytes whose SHA-256 the receiver echoes back.
// One JSON line per pair goes to stdout; the exit code is 1 if any pair failed.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/ipn/store/mem"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
)

type result struct {
	Pair       int     `json:"pair"`
	KeyA       string  `json:"key_a"`
	KeyB       string  `json:"key_b"`
	DERPRegion int     `json:"derp_region"`
	Endpoint   string  `json:"endpoint"`
	PingMS     float64 `json:"ping_ms"`
	Bytes      int64   `json:"bytes"`
	Seconds    float64 `json:"seconds"`
	MbitPerSec float64 `json:"mbit_s"`
	HomeA      string  `json:"home_a"`
	HomeB      string  `json:"home_b"`
	OK         bool    `json:"ok"`
	Error      string  `json:"error,omitempty"`
}

type node struct {
	srv *tsnet.Server
	ip  netip.Addr
	key string
}

func startNode(ctx context.Context, dir, control, name string, home int) (*node, error) {
	nodeDir := filepath.Join(dir, name)
	if err := os.MkdirAll(nodeDir, 0o700); err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(nodeDir, "tsnet.log"))
	if err != nil {
		return nil, err
	}
	logger := log.New(logFile, name+": ", log.Lmicroseconds)
	srv := &tsnet.Server{
		Dir:        nodeDir,
		ControlURL: control,
		Hostname:   name,
		Store:      new(mem.Store),
		Ephemeral:  true,
		Logf:       logger.Printf,
		UserLogf:   logger.Printf,
	}
	st, err := srv.Up(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if home != 0 {
		lc, err := srv.LocalClient()
		if err != nil {
			return nil, err
		}
		// The home region a user would get by latency is not ours to choose in a test where
		// every region is on loopback; tailscale's own debug action pins it.
		if err := lc.DebugActionBody(ctx, "force-prefer-derp", strings.NewReader(strconv.Itoa(home))); err != nil {
			return nil, fmt.Errorf("%s: force-prefer-derp %d: %w", name, home, err)
		}
		if err := waitHome(ctx, srv, home); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	return &node{srv: srv, ip: st.TailscaleIPs[0], key: fmt.Sprintf("%x", st.Self.PublicKey.Raw32())}, nil
}

// homeCode is the region code of the node's home DERP region ("" until it has one).
func homeCode(ctx context.Context, srv *tsnet.Server) string {
	lc, err := srv.LocalClient()
	if err != nil {
		return ""
	}
	st, err := lc.Status(ctx)
	if err != nil || st.Self == nil {
		return ""
	}
	return st.Self.Relay
}

func waitHome(ctx context.Context, srv *tsnet.Server, region int) error {
	lc, err := srv.LocalClient()
	if err != nil {
		return err
	}
	dm, err := lc.CurrentDERPMap(ctx)
	if err != nil {
		return err
	}
	r := dm.Regions[region]
	if r == nil {
		return fmt.Errorf("region %d is not in the DERP map", region)
	}
	for ctx.Err() == nil {
		if homeCode(ctx, srv) == r.RegionCode {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("home region never became %d (%s)", region, r.RegionCode)
}

// serveDigest accepts one connection at a time and answers each with the hex SHA-256 of what it read.
func serveDigest(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			h := sha256.New()
			if _, err := io.Copy(h, conn); err != nil {
				return
			}
			io.WriteString(conn, hex.EncodeToString(h.Sum(nil)))
		}()
	}
}

func pingUntilDERP(ctx context.Context, a, b *node, res *result) error {
	lc, err := a.srv.LocalClient()
	if err != nil {
		return err
	}
	var lastErr error
	for ctx.Err() == nil {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		pr, err := lc.Ping(pctx, b.ip, tailcfg.PingDisco)
		cancel()
		if err == nil && pr.Err == "" {
			res.DERPRegion = pr.DERPRegionID
			res.Endpoint = pr.Endpoint
			res.PingMS = pr.LatencySeconds * 1000
			return nil
		}
		if err != nil {
			lastErr = err
		} else {
			lastErr = errors.New(pr.Err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("disco ping never answered: %v", lastErr)
}

func transfer(ctx context.Context, a, b *node, size int64, res *result) error {
	conn, err := a.srv.Dial(ctx, "tcp", netip.AddrPortFrom(b.ip, 7000).String())
	if err != nil {
		return err
	}
	defer conn.Close()
	h := sha256.New()
	src := io.LimitReader(rand.NewChaCha8([32]byte{byte(res.Pair)}), size)
	start := time.Now()
	if _, err := io.Copy(io.MultiWriter(conn, h), src); err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		return fmt.Errorf("reading digest: %w", err)
	}
	res.Seconds = time.Since(start).Seconds()
	res.Bytes = size
	res.MbitPerSec = float64(size) * 8 / 1e6 / res.Seconds
	if want := hex.EncodeToString(h.Sum(nil)); string(got) != want {
		return fmt.Errorf("digest mismatch: receiver got %q, sender sent %q", got, want)
	}
	return nil
}

func main() {
	control := flag.String("control", "", "control server URL")
	pairs := flag.Int("pairs", 1, "pairs of nodes")
	size := flag.Int64("bytes", 10<<20, "bytes to send through each pair")
	dir := flag.String("dir", "", "state directory")
	timeout := flag.Duration("timeout", 150*time.Second, "overall deadline")
	homeA := flag.Int("home-a", 0, "DERP region the first node of each pair is pinned to (0: by latency)")
	homeB := flag.Int("home-b", 0, "DERP region the second node of each pair is pinned to (0: by latency)")
	bFirst := flag.String("b-first", "", "start the second nodes first, print \"b-up\", and start the first nodes once this file exists")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	nodes := make([]*node, 2**pairs)
	start := func(side int, home int) {
		errs := make([]error, *pairs)
		var wg sync.WaitGroup
		for p := range *pairs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				i := 2*p + side
				nodes[i], errs[p] = startNode(ctx, *dir, *control, fmt.Sprintf("n%d", i), home)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			log.Fatalf("starting nodes: %v", err)
		}
	}
	if *bFirst != "" {
		start(1, *homeB)
		fmt.Println("b-up")
		for {
			if _, err := os.Stat(*bFirst); err == nil {
				break
			}
			if ctx.Err() != nil {
				log.Fatalf("%s never appeared", *bFirst)
			}
			time.Sleep(50 * time.Millisecond)
		}
		start(0, *homeA)
	} else {
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); start(0, *homeA) }()
		go func() { defer wg.Done(); start(1, *homeB) }()
		wg.Wait()
	}
	failed := false
	out := json.NewEncoder(os.Stdout)
	for p := range *pairs {
		a, b := nodes[2*p], nodes[2*p+1]
		res := result{Pair: p, KeyA: a.key, KeyB: b.key}
		ln, err := b.srv.Listen("tcp", ":7000")
		if err == nil {
			go serveDigest(ln)
			err = pingUntilDERP(ctx, a, b, &res)
		}
		if err == nil {
			err = transfer(ctx, a, b, *size, &res)
		}
		res.HomeA, res.HomeB = homeCode(ctx, a.srv), homeCode(ctx, b.srv)
		res.OK = err == nil
		if err != nil {
			res.Error = err.Error()
			failed = true
		}
		out.Encode(res)
	}
	for _, n := range nodes {
		n.srv.Close()
	}
	if failed {
		os.Exit(1)
	}
}
