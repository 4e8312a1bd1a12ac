// Command derpload is a closed-loop DERP load generator built on Tailscale's own client
// (derp/derphttp), so every frame is its own write, as real clients send them. Each pair is a
// sender and a receiver; the sender keeps -window packets in flight. One JSON line on stdout.
//
// Every packet carries its send time (nanoseconds on this process's monotonic clock) in its
// first 8 bytes, so the receiver measures one-way latency through the relay with no clock sync.
// With -rate the senders are paced (still at most -window in flight): latency below saturation.
//
// With -pin the caller places the clients: derpload connects them one at a time (sender 0,
// receiver 0, sender 1, ...), prints "connected <i>" on stderr after each, and reads one line on
// stdin: "keep" moves on, "retry" closes that client and connects a fresh one in its place. A
// relay whose workers share a port (SO_REUSEPORT) can so be told apart from outside: the caller
// watches which worker's accept counter grew.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"slices"
	"strings"
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
	// latencies of the packets received while counting, in nanoseconds (the receiver's only)
	latencies []int64
}

// epoch is the zero of the timestamps packets carry: time.Since reads the monotonic clock.
var epoch = time.Now()

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

// placed connects one client and lets the caller keep it or ask for another (see -pin).
func placed(ctx context.Context, url string, netMon *netmon.Monitor, index int, answers *bufio.Scanner) (*derphttp.Client, key.NodePublic) {
	for {
		c, pub := connect(ctx, url, netMon)
		fmt.Fprintf(os.Stderr, "connected %d\n", index)
		if !answers.Scan() {
			log.Fatal("-pin: stdin closed before the placement answer")
		}
		switch answer := strings.TrimSpace(answers.Text()); answer {
		case "keep":
			return c, pub
		case "retry":
			c.Close()
		default:
			log.Fatalf("-pin: answer %q is neither keep nor retry", answer)
		}
	}
}

func (p *pair) receive(counting *atomic.Bool, measured *atomic.Int64) {
	for {
		m, err := p.rx.Recv()
		if err != nil {
			return
		}
		packet, ok := m.(derp.ReceivedPacket)
		if !ok {
			continue
		}
		p.received.Add(1)
		if counting.Load() {
			measured.Add(1)
			if len(packet.Data) >= 8 {
				sentAt := int64(binary.BigEndian.Uint64(packet.Data))
				p.latencies = append(p.latencies, int64(time.Since(epoch))-sentAt)
			}
		}
		select {
		case p.credit <- struct{}{}:
		default:
		}
	}
}

// send keeps up to window packets in flight; with interval > 0 it also paces them, one per
// interval (an open loop under the window: the latency of a relay that is not saturated).
func (p *pair) send(ctx context.Context, window int64, size int, interval time.Duration) {
	payload := make([]byte, size)
	next := time.Now()
	for ctx.Err() == nil {
		if interval > 0 {
			now := time.Now()
			if wait := next.Sub(now); wait > 0 {
				time.Sleep(wait)
			} else if wait < -20*time.Millisecond {
				next = now // far behind (a stall): do not burst to catch up
			}
			next = next.Add(interval)
		}
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
		if size >= 8 {
			binary.BigEndian.PutUint64(payload, uint64(time.Since(epoch)))
		}
		if err := p.tx.Send(p.rxKey, payload); err != nil {
			return
		}
		p.sent.Add(1)
	}
}

// percentilesUS summarises latencies (ns) as p50/p90/p99/max in microseconds.
func percentilesUS(all []*pair) map[string]float64 {
	var samples []int64
	for _, p := range all {
		samples = append(samples, p.latencies...)
	}
	if len(samples) == 0 {
		return nil
	}
	slices.Sort(samples)
	at := func(q float64) float64 { return float64(samples[int(q*float64(len(samples)-1))]) / 1e3 }
	return map[string]float64{"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1), "samples": float64(len(samples))}
}

func main() {
	url := flag.String("url", "", "relay URL (http://, https://)")
	urlB := flag.String("url-b", "", "relay URL for the receivers (default: -url)")
	pairs := flag.Int("pairs", 4, "sender/receiver pairs")
	size := flag.Int("size", 1200, "packet bytes (at least 8 for latency: the send time rides in the first 8)")
	window := flag.Int64("window", 32, "packets in flight per pair")
	seconds := flag.Float64("seconds", 5, "measured seconds")
	warmup := flag.Float64("warmup", 1, "unmeasured seconds first")
	pin := flag.Bool("pin", false, "connect one client at a time; after each \"connected <i>\" on stderr read keep or retry on stdin")
	rate := flag.Float64("rate", 0, "packets/s over all pairs, paced (0: as fast as the window allows)")
	hold := flag.Bool("hold", false, "after \"measured\" keep the clients open until a line (or EOF) on stdin")
	flag.Parse()
	if *urlB == "" {
		*urlB = *url
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	netMon := netmon.NewStatic()
	answers := bufio.NewScanner(os.Stdin)
	open := func(url string, index int) (*derphttp.Client, key.NodePublic) {
		if *pin {
			return placed(ctx, url, netMon, index, answers)
		}
		return connect(ctx, url, netMon)
	}
	var counting atomic.Bool
	var measured atomic.Int64
	all := make([]*pair, *pairs)
	var receivers sync.WaitGroup
	for i := range all {
		p := &pair{credit: make(chan struct{}, 1)}
		p.tx, _ = open(*url, 2*i)
		p.rx, p.rxKey = open(*urlB, 2*i+1)
		all[i] = p
		receivers.Add(1)
		go func() { defer receivers.Done(); p.receive(&counting, &measured) }()
	}
	// warm every pair until a packet gets through: the receiver is registered everywhere. All
	// pairs are probed in each pass, so 200 pairs cost a few passes, not 200 sleeps.
	deadline := time.Now().Add(10 * time.Second)
	for cold := all; len(cold) > 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			log.Fatalf("%d pairs never delivered their first packet", len(cold))
		}
		var still []*pair
		for _, p := range cold {
			if p.received.Load() == 0 {
				p.tx.Send(p.rxKey, make([]byte, 64))
				still = append(still, p)
			}
		}
		cold = still
	}
	for _, p := range all {
		p.sent.Store(p.received.Load())
	}
	var interval time.Duration
	if *rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(*pairs) / *rate)
	}
	var wg sync.WaitGroup
	for _, p := range all {
		wg.Add(1)
		go func() { defer wg.Done(); p.send(ctx, *window, *size, interval) }()
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
	if *hold {
		// the caller samples the server after "measured": closing the clients first would charge
		// their teardown to the window and empty the server's connection gauges
		answers.Scan() // a line or EOF: either is the go-ahead
	}
	var stalls int64
	for _, p := range all {
		stalls += p.stalls.Load()
	}
	// Closing ends every receiver's Recv loop; only then are their latencies safe to read.
	for _, p := range all {
		p.tx.Close()
		p.rx.Close()
	}
	receivers.Wait()
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"pairs": *pairs, "size": *size, "window": *window, "seconds": elapsed,
		"packets": measured.Load(), "packets_per_second": float64(measured.Load()) / elapsed,
		"mbit_per_second": float64(measured.Load()) * float64(*size) * 8 / 1e6 / elapsed, "stalls": stalls,
		"latency_us": percentilesUS(all), "rate": *rate,
	})
}
