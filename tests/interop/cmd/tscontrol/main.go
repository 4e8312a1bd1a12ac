// Command tscontrol serves Tailscale's own test control server (tstest/integration/testcontrol)
// with a DERP map of the test's choosing, plus the admission endpoint derper's
// --verify-client-url speaks, answered from the control server's node list.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strings"

	"gopkg.in/yaml.v3"

	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	derpMapFile := flag.String("derpmap", "", "file holding the tailcfg.DERPMap to hand out: JSON, or headscale's YAML if named *.yaml")
	verbose := flag.Bool("verbose", false, "log every control request")
	flag.Parse()

	raw, err := os.ReadFile(*derpMapFile)
	if err != nil {
		log.Fatalf("reading -derpmap: %v", err)
	}
	derpMap := new(tailcfg.DERPMap)
	if strings.HasSuffix(*derpMapFile, ".yaml") {
		// headscale reads its derp.paths files this way: yaml.v3 straight into tailcfg.DERPMap
		err = yaml.Unmarshal(raw, derpMap)
	} else {
		err = json.Unmarshal(raw, derpMap)
	}
	if err != nil || len(derpMap.Regions) == 0 {
		log.Fatalf("parsing -derpmap: %v (%d regions)", err, len(derpMap.Regions))
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	baseURL := "http://" + ln.Addr().String()
	control := &testcontrol.Server{
		DERPMap:          derpMap,
		ExplicitBaseURL:  baseURL,
		AllNodesSameUser: true,
		Verbose:          *verbose,
		Logf:             log.Printf,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/verify", func(w http.ResponseWriter, r *http.Request) {
		var req tailcfg.DERPAdmitClientRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		allow := control.Node(req.NodePublic) != nil
		log.Printf("verify %v from %v: allow=%v", req.NodePublic.ShortString(), req.Source, allow)
		json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
	})
	mux.Handle("/", control)
	fmt.Printf("control %s\n", baseURL)
	os.Stdout.Sync()
	log.Fatal(http.Serve(ln, mux))
}
