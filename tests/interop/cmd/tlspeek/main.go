// tlspeek dials a TLS server with Go's crypto/tls (the stack tailscaled uses) and prints, for each
// certificate the server sent, its subject CN and serial number, one per line: "CN<TAB>SERIAL".
// Used by tests/process/test_cert_manual.py to check that Go parses our chain, meta certificate included.
package main

import (
	"crypto/tls"
	"fmt"
	"os"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: tlspeek HOST:PORT SERVERNAME")
		os.Exit(2)
	}
	conn, err := tls.Dial("tcp", os.Args[1], &tls.Config{ServerName: os.Args[2], InsecureSkipVerify: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	for _, cert := range conn.ConnectionState().PeerCertificates {
		fmt.Printf("%s\t%s\n", cert.Subject.CommonName, cert.SerialNumber)
	}
}
