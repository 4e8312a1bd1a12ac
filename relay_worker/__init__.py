"""One DERP relay worker: wire codec, handshake, relay state, HTTP server and client library."""
