// gorpc: the Go side of bench_protocol.py's RPC table (standard library only).
//
//	gorpc serve SOCK
//	    A plugin server as Go plugins are written (docker/go-plugins-helpers): net/http on a
//	    Unix socket, every POST answered with the JSON body {} after its request is read.
//	gorpc call SOCK N METHOD JSON
//	    N round trips of METHOD with body JSON through a client built the way dockerd's
//	    pkg/plugins builds its own (net/http Transport dialling the socket, compression
//	    off, a json.Encoder body, the plugin Accept header, the reply JSON-decoded), after
//	    min(N, 50) untimed warm-up calls. Prints one line: the N round-trip times in ns.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

const versionMimetype = "application/vnd.docker.plugins.v1.2+json"

func serve(sock string) error {
	listener, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/vnd.docker.plugins.v1+json")
		_ = json.NewEncoder(w).Encode(struct{}{})
	})
	return http.Serve(listener, handler)
}

func call(sock string, n int, method string, body string) error {
	var args interface{}
	if err := json.Unmarshal([]byte(body), &args); err != nil {
		return fmt.Errorf("request body: %w", err)
	}
	dialer := &net.Dialer{Timeout: 32 * time.Second}
	transport := &http.Transport{
		DisableCompression: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", sock)
		},
	}
	client := &http.Client{Transport: transport}
	once := func() error {
		var buf bytes.Buffer
		if err := json.NewEncoder(&buf).Encode(args); err != nil {
			return err
		}
		req, err := http.NewRequest(http.MethodPost, "/"+method, &buf)
		if err != nil {
			return err
		}
		req.Header.Add("Accept", versionMimetype)
		req.URL.Scheme = "http"
		req.URL.Host = sock
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var reply map[string]interface{}
		if err := json.NewDecoder(resp.Body).Decode(&reply); err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK || reply["Err"] != nil && reply["Err"] != "" {
			return fmt.Errorf("%s: HTTP %d: %v", method, resp.StatusCode, reply["Err"])
		}
		return nil
	}
	warm := n
	if warm > 50 {
		warm = 50
	}
	for i := 0; i < warm; i++ {
		if err := once(); err != nil {
			return err
		}
	}
	samples := make([]string, n)
	for i := range samples {
		started := time.Now()
		if err := once(); err != nil {
			return err
		}
		samples[i] = strconv.FormatInt(int64(time.Since(started)), 10)
	}
	fmt.Println(strings.Join(samples, " "))
	return nil
}

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "serve":
		err = serve(os.Args[2])
	case len(os.Args) == 6 && os.Args[1] == "call":
		var n int
		if n, err = strconv.Atoi(os.Args[3]); err == nil {
			err = call(os.Args[2], n, os.Args[4], os.Args[5])
		}
	default:
		err = fmt.Errorf("usage: gorpc serve SOCK | gorpc call SOCK N METHOD JSON")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gorpc:", err)
		os.Exit(1)
	}
}
