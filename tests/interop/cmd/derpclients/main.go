// Command derpclients connects -n clients of Tailscale's own DERP client (derp/derphttp) to each
// of two relay URLs, pairs client i of -a with client i of -b, and checks that -packets packets
// in each direction of every pair arrive intact. It prints one JSON summary line and exits 1 when
// any packet is missing.
package main

import (
	"context"
	"encoding/binary"
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

const (
	kindHello = 1
	kindData  = 2
)

type client struct {
	c    *derphttp.Client
	key  key.NodePublic
	peer key.NodePublic
	// heardHello is set once the peer's hello has arrived: the path works both ways from here.
	heardHello atomic.Bool
	mu         sync.Mutex
	got        map[uint32]bool
	bad        int
}

func newClient(ctx context.Context, url string, netMon *netmon.Monitor, logf logger.Logf) (*client, error) {
	priv := key.NewNode()
	c, err := derphttp.NewClient(priv, url, logf, netMon)
	if err != nil {
		return nil, err
	}
	if err := c.Connect(ctx); err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", url, err)
	}
	return &client{c: c, key: priv.Public(), got: map[uint32]bool{}}, nil
}

func packet(kind byte, seq uint32, size int) []byte {
	b := make([]byte, size)
	b[0] = kind
	binary.BigEndian.PutUint32(b[1:5], seq)
	for i := 5; i < size; i++ {
		b[i] = byte(seq) ^ byte(i)
	}
	return b
}

func (cl *client) receive(ctx context.Context, size int) {
	for ctx.Err() == nil {
		m, err := cl.c.Recv()
		if err != nil {
			if ctx.Err() == nil {
				log.Printf("recv %v: %v", cl.key.ShortString(), err)
				time.Sleep(50 * time.Millisecond) // the client reconnects on the next Recv
			}
			continue
		}
		p, ok := m.(derp.ReceivedPacket)
		if !ok || p.Source != cl.peer || len(p.Data) < 5 {
			continue
		}
		seq := binary.BigEndian.Uint32(p.Data[1:5])
		switch p.Data[0] {
		case kindHello:
			cl.heardHello.Store(true)
		case kindData:
			cl.mu.Lock()
			if string(p.Data) != string(packet(kindData, seq, size)) {
				cl.bad++
			} else {
				cl.got[seq] = true
			}
			cl.mu.Unlock()
		}
	}
}

type summary struct {
	Pairs     int     `json:"pairs"`
	Packets   int     `json:"packets_per_direction"`
	Sent      int     `json:"sent"`
	Received  int     `json:"received"`
	Corrupt   int     `json:"corrupt"`
	ReceivedA int     `json:"received_on_a"`
	ReceivedB int     `json:"received_on_b"`
	HelloSecs float64 `json:"hello_seconds"`
	OK        bool    `json:"ok"`
	Error     string  `json:"error,omitempty"`
}

func main() {
	urlA := flag.String("a", "", "relay URL for the first side, e.g. http://127.0.0.1:3340/derp")
	urlB := flag.String("b", "", "relay URL for the second side")
	n := flag.Int("n", 8, "clients on each side")
	packets := flag.Int("packets", 100, "data packets per direction per pair")
	size := flag.Int("size", 1200, "packet size")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline for the whole run")
	verbose := flag.Bool("v", false, "log the DERP clients")
	burst := flag.Int("burst", 4, "packets each client sends between pauses")
	pause := flag.Duration("pause", 5*time.Millisecond, "pause after each burst")
	admission := flag.Bool("admission", false, "connect one fresh key to -a and report whether the relay admits it")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	logf := logger.Discard
	if *verbose {
		logf = log.Printf
	}
	netMon := netmon.NewStatic()
	if *admission {
		checkAdmission(ctx, *urlA, netMon, logf)
		return
	}
	var sideA, sideB []*client
	for i := 0; i < *n; i++ {
		a, err := newClient(ctx, *urlA, netMon, logf)
		if err != nil {
			log.Fatal(err)
		}
		b, err := newClient(ctx, *urlB, netMon, logf)
		if err != nil {
			log.Fatal(err)
		}
		a.peer, b.peer = b.key, a.key
		sideA, sideB = append(sideA, a), append(sideB, b)
	}
	all := append(append([]*client{}, sideA...), sideB...)
	for _, cl := range all {
		go cl.receive(ctx, *size)
	}
	sum := summary{Pairs: *n, Packets: *packets}
	// Hellos until every client has heard its peer: a real client retries too while a mesh
	// learns a new key; only what follows has to arrive whole.
	start := time.Now()
	for {
		done := true
		for _, cl := range all {
			if !cl.heardHello.Load() {
				done = false
			}
			if err := cl.c.Send(cl.peer, packet(kindHello, 0, 64)); err != nil {
				logf("send hello %v: %v", cl.key.ShortString(), err)
			}
		}
		if done {
			break
		}
		if ctx.Err() != nil {
			sum.Error = "peers never heard each other's hello"
			json.NewEncoder(os.Stdout).Encode(sum)
			os.Exit(1)
		}
		time.Sleep(100 * time.Millisecond)
	}
	sum.HelloSecs = time.Since(start).Seconds()
	for seq := 0; seq < *packets; seq++ {
		for _, cl := range all {
			if err := cl.c.Send(cl.peer, packet(kindData, uint32(seq), *size)); err == nil {
				sum.Sent++
			} else {
				logf("send %v: %v", cl.key.ShortString(), err)
			}
		}
		if seq%*burst == *burst-1 {
			// Stay well inside the relays' 32-packet queues: a relay that forwards to a mesh peer
			// may receive a whole burst in one read and queue it for one client at once.
			time.Sleep(*pause)
		}
	}
	want := len(all) * *packets
	count := func() (got, bad int) {
		for _, cl := range all {
			cl.mu.Lock()
			got += len(cl.got)
			bad += cl.bad
			cl.mu.Unlock()
		}
		return
	}
	for ctx.Err() == nil {
		if got, _ := count(); got >= want {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	sum.Received, sum.Corrupt = count()
	for _, cl := range sideA {
		sum.ReceivedA += len(cl.got)
	}
	for _, cl := range sideB {
		sum.ReceivedB += len(cl.got)
	}
	sum.OK = sum.Received == want && sum.Corrupt == 0
	if !sum.OK {
		sum.Error = fmt.Sprintf("%d of %d packets arrived, %d corrupt", sum.Received, want, sum.Corrupt)
	}
	json.NewEncoder(os.Stdout).Encode(sum)
	for _, cl := range all {
		cl.c.Close()
	}
	if !sum.OK {
		os.Exit(1)
	}
}

// checkAdmission prints {"admitted": true} when the relay answers a fresh key's ClientInfo with
// ServerInfo, and {"admitted": false} when it closes the connection instead.
func checkAdmission(ctx context.Context, url string, netMon *netmon.Monitor, logf logger.Logf) {
	cl, err := newClient(ctx, url, netMon, logf)
	admitted := false
	detail := ""
	if err != nil {
		detail = err.Error()
	} else {
		m, err := cl.c.Recv()
		if err != nil {
			detail = err.Error()
		} else if _, ok := m.(derp.ServerInfoMessage); ok {
			admitted = true
		} else {
			detail = fmt.Sprintf("first message %T", m)
		}
		cl.c.Close()
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"admitted": admitted, "detail": detail})
}
