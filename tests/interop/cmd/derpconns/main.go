// Command derpconns measures what DERP connections themselves cost a relay, with Tailscale's own
// client (derp/derphttp): every connection is a real TLS (or plain) dial, HTTP upgrade and DERP
// handshake under a fresh node key.
//
//	-mode idle: connect -clients clients (-concurrency at a time) and print one JSON line on
//	stdout; keep them open until stdin closes, then close them and exit. The caller reads the
//	relay's RSS in between.
//	-mode handshakes: -concurrency loops of connect + close; "measuring" and "measured" on stderr
//	bracket the -seconds window (after -warmup), then one JSON line on stdout.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

func dial(ctx context.Context, url string, netMon *netmon.Monitor) (*derphttp.Client, error) {
	c, err := derphttp.NewClient(key.NewNode(), url, logger.Discard, netMon)
	if err != nil {
		return nil, err
	}
	if err := c.Connect(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func idle(ctx context.Context, url string, netMon *netmon.Monitor, clients, concurrency int) {
	all := make([]*derphttp.Client, clients)
	var next atomic.Int64
	var failures atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < clients; i = int(next.Add(1)) - 1 {
				c, err := dial(ctx, url, netMon)
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				all[i] = c
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"mode": "idle", "clients": clients - int(failures.Load()), "failures": failures.Load(),
		"first_error": firstErr.Load(), "connect_seconds": elapsed,
		"connects_per_second": float64(clients) / elapsed,
	})
	io.Copy(io.Discard, os.Stdin)
	for _, c := range all {
		if c != nil {
			c.Close()
		}
	}
}

func handshakes(ctx context.Context, url string, netMon *netmon.Monitor, concurrency int, warmup, seconds float64) {
	var counting atomic.Bool
	var done, failures atomic.Int64
	var firstErr atomic.Value
	latencies := make([][]int64, concurrency)
	loopCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for g := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for loopCtx.Err() == nil {
				began := time.Now()
				c, err := dial(loopCtx, url, netMon)
				if err != nil {
					if loopCtx.Err() == nil {
						failures.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
					}
					continue
				}
				c.Close()
				if counting.Load() {
					done.Add(1)
					latencies[g] = append(latencies[g], int64(time.Since(began)))
				}
			}
		}()
	}
	time.Sleep(time.Duration(warmup * float64(time.Second)))
	fmt.Fprintln(os.Stderr, "measuring")
	counting.Store(true)
	start := time.Now()
	time.Sleep(time.Duration(seconds * float64(time.Second)))
	counting.Store(false)
	fmt.Fprintln(os.Stderr, "measured")
	elapsed := time.Since(start).Seconds()
	stop()
	wg.Wait()
	all := slices.Concat(latencies...)
	slices.Sort(all)
	at := func(q float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(q*float64(len(all)-1))]) / 1e3
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"mode": "handshakes", "concurrency": concurrency, "seconds": elapsed, "handshakes": done.Load(),
		"handshakes_per_second": float64(done.Load()) / elapsed, "failures": failures.Load(),
		"first_error": firstErr.Load(),
		"latency_us": map[string]float64{"p50": at(0.5), "p99": at(0.99), "max": at(1)},
	})
}

func main() {
	mode := flag.String("mode", "", "idle or handshakes")
	url := flag.String("url", "", "relay URL (http://, https://)")
	clients := flag.Int("clients", 1000, "idle: clients to hold open")
	concurrency := flag.Int("concurrency", 32, "connections being opened at once")
	seconds := flag.Float64("seconds", 5, "handshakes: measured seconds")
	warmup := flag.Float64("warmup", 1, "handshakes: unmeasured seconds first")
	flag.Parse()
	netMon := netmon.NewStatic()
	ctx := context.Background()
	switch *mode {
	case "idle":
		idle(ctx, *url, netMon, *clients, *concurrency)
	case "handshakes":
		handshakes(ctx, *url, netMon, *concurrency, *warmup, *seconds)
	default:
		log.Fatalf("-mode must be idle or handshakes, not %q", *mode)
	}
}
