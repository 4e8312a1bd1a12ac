// Command derpload is a closed-loop DERP load generator built on Tailscale's own client
// (derp/derphttp), so every frame is its own write, as real clients send them. Each pair is a
// sender and a receiver; the sender keeps -window packets in flight. One JSON line on stdout.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

type pair struct {
	tx, rx   *derphttp.Client
	rxKey    key.NodePublic
	sent     atomic.Int64
	received atomic.Int64
	credit   chan struct{}
	stalls   atomic.Int64
}

func connect(ctx context.Context, url string, netMon *netmon.Monitor) (*derphttp.Client, key.NodePublic) {
	priv := key.NewNode()
	c, err := derphttp.NewClient(priv, url, logger.Discard, netMon)
	if err != nil {
		log.Fatal(err)
	}
	if err := c.Connect(ctx); err != nil {
		log.Fatalf("connect %s: %v", url, err)
	}
	return c, priv.Public()
}

func (p *pair) receive(counting *atomic.Bool, measured *atomic.Int64) {
	for {
		m, err := p.rx.Recv()
		if err != nil {
			return
		}
		if _, ok := m.(derp.ReceivedPacket); !ok {
			continue
		}
		p.received.Add(1)
		if counting.Load() {
			measured.Add(1)
		}
		select {
		case p.credit <- struct{}{}:
		default:
		}
	}
}

func (p *pair) send(ctx context.Context, window int64, payload []byte) {
	for ctx.Err() == nil {
		if p.sent.Load()-p.received.Load() >= window {
			select {
			case <-p.credit:
			case <-time.After(200 * time.Millisecond):
				// dropped packets never come back: forget them rather than stall forever
				p.stalls.Add(1)
				p.sent.Store(p.received.Load())
			case <-ctx.Done():
				return
			}
			continue
		}
		if err := p.tx.Send(p.rxKey, payload); err != nil {
			return
		}
		p.sent.Add(1)
	}
}

func main() {
	url := flag.String("url", "", "relay URL (http://, https://)")
	urlB := flag.String("url-b", "", "relay URL for the receivers (default: -url)")
	pairs := flag.Int("pairs", 4, "sender/receiver pairs")
	size := flag.Int("size", 1200, "packet bytes")
	window := flag.Int64("window", 32, "packets in flight per pair")
	seconds := flag.Float64("seconds", 5, "measured seconds")
	warmup := flag.Float64("warmup", 1, "unmeasured seconds first")
	flag.Parse()
	if *urlB == "" {
		*urlB = *url
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	netMon := netmon.NewStatic()
	var counting atomic.Bool
	var measured atomic.Int64
	all := make([]*pair, *pairs)
	for i := range all {
		p := &pair{credit: make(chan struct{}, 1)}
		p.tx, _ = connect(ctx, *url, netMon)
		p.rx, p.rxKey = connect(ctx, *urlB, netMon)
		all[i] = p
		go p.receive(&counting, &measured)
	}
	// warm every pair until a packet gets through: the receiver is registered everywhere
	for _, p := range all {
		deadline := time.Now().Add(10 * time.Second)
		for p.received.Load() == 0 {
			if time.Now().After(deadline) {
				log.Fatal("a pair never delivered its first packet")
			}
			p.tx.Send(p.rxKey, make([]byte, 64))
			time.Sleep(20 * time.Millisecond)
		}
		p.sent.Store(p.received.Load())
	}
	payload := make([]byte, *size)
	var wg sync.WaitGroup
	for _, p := range all {
		wg.Add(1)
		go func() { defer wg.Done(); p.send(ctx, *window, payload) }()
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	// The markers let a caller sample the server's CPU over exactly the measured window.
	fmt.Fprintln(os.Stderr, "measuring")
	counting.Store(true)
	start := time.Now()
	time.Sleep(time.Duration(*seconds * float64(time.Second)))
	counting.Store(false)
	fmt.Fprintln(os.Stderr, "measured")
	elapsed := time.Since(start).Seconds()
	cancel()
	var stalls int64
	for _, p := range all {
		stalls += p.stalls.Load()
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"pairs": *pairs, "size": *size, "window": *window, "seconds": elapsed,
		"packets": measured.Load(), "packets_per_second": float64(measured.Load()) / elapsed,
		"mbit_per_second": float64(measured.Load()) * float64(*size) * 8 / 1e6 / elapsed, "stalls": stalls,
	})
	for _, p := range all {
		p.tx.Close()
		p.rx.Close()
	}
}
