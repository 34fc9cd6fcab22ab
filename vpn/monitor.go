package vpn

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/obvpn/obvpn/vpn/haproxy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// RequireMonitorToken guards next with the monitoring credentials
// (MONITOR_SECRET_TOKEN): every request but GET /ping must carry HTTP
// Basic credentials [haproxy.MonitorUser]:token, else it is answered 401 with a
// WWW-Authenticate challenge. The credentials are compared in constant
// time and never logged. An empty token guards nothing: next is returned
// as is.
func RequireMonitorToken(token string, next http.Handler) http.Handler {
	if token == "" {
		return next
	}
	want := sha256.Sum256([]byte(haproxy.MonitorUser + ":" + token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ping" {
			next.ServeHTTP(w, r)
			return
		}
		user, pass, _ := r.BasicAuth()
		// Hashes of equal length: the comparison takes as long whatever
		// was sent.
		got := sha256.Sum256([]byte(user + ":" + pass))
		if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Basic realm="`+haproxy.MonitorRealm+`"`)
			http.Error(w, "monitoring credentials required", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// ClientSession is one established OpenVPN session, as [Sessions.Clients]
// reports it.
type ClientSession struct {
	Instance   int       // the instance id
	CID        uint64    // OpenVPN's client id
	CommonName string    // the device's UUID
	Since      time.Time // when it was established
	// RxBytes and TxBytes are the bytes received from and sent to the
	// device, as of OpenVPN's last byte count (VPN_BYTECOUNT_INTERVAL);
	// zero while byte counting is off.
	RxBytes, TxBytes uint64
}

// Clients returns the established sessions, by instance and client id.
func (s *Sessions) Clients() []ClientSession {
	s.mu.Lock()
	out := make([]ClientSession, 0, len(s.established))
	for k, e := range s.established {
		out = append(out, ClientSession{Instance: k.instance, CID: k.cid, CommonName: e.cn, Since: e.since, RxBytes: e.rx, TxBytes: e.tx})
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Instance != out[j].Instance {
			return out[i].Instance < out[j].Instance
		}
		return out[i].CID < out[j].CID
	})
	return out
}

// ClientCollector is a Prometheus collector of the per-client byte counts
// of [Sessions] by common name, what the reference container's openvpn
// exporter served at /metrics/openvpn:
//
//	openvpn_server_client_received_bytes_total{instance,common_name}
//	openvpn_server_client_sent_bytes_total{instance,common_name}
//	openvpn_server_client_connected_since_seconds{instance,common_name}
//	openvpn_server_connected_clients{instance}
//
// A device with several sessions on one instance is one series, its
// sessions' sums (and its oldest session's start). The counts move with
// OpenVPN's byte counts (VPN_BYTECOUNT_INTERVAL).
type ClientCollector struct {
	// Sessions are the sessions to report.
	Sessions *Sessions
}

var (
	clientRxDesc = prometheus.NewDesc("openvpn_server_client_received_bytes_total",
		"Bytes received from the client, as of OpenVPN's last byte count.", []string{"instance", "common_name"}, nil)
	clientTxDesc = prometheus.NewDesc("openvpn_server_client_sent_bytes_total",
		"Bytes sent to the client, as of OpenVPN's last byte count.", []string{"instance", "common_name"}, nil)
	clientSinceDesc = prometheus.NewDesc("openvpn_server_client_connected_since_seconds",
		"When the client's oldest session was established, in seconds since the epoch.", []string{"instance", "common_name"}, nil)
	clientsDesc = prometheus.NewDesc("openvpn_server_connected_clients",
		"Clients connected to the instance.", []string{"instance"}, nil)
)

// Describe implements prometheus.Collector.
func (c ClientCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- clientRxDesc
	ch <- clientTxDesc
	ch <- clientSinceDesc
	ch <- clientsDesc
}

// Collect implements prometheus.Collector.
func (c ClientCollector) Collect(ch chan<- prometheus.Metric) {
	if c.Sessions == nil {
		return
	}
	type key struct {
		instance int
		cn       string
	}
	type sum struct {
		rx, tx uint64
		since  time.Time
	}
	sums := map[key]*sum{}
	var order []key
	clients := map[int]int{}
	for _, s := range c.Sessions.Clients() {
		k := key{s.Instance, strings.ToLower(s.CommonName)}
		clients[s.Instance]++
		t := sums[k]
		if t == nil {
			t = &sum{since: s.Since}
			sums[k] = t
			order = append(order, k)
		}
		t.rx += s.RxBytes
		t.tx += s.TxBytes
		if s.Since.Before(t.since) {
			t.since = s.Since
		}
	}
	for _, k := range order {
		t, id := sums[k], strconv.Itoa(k.instance)
		ch <- prometheus.MustNewConstMetric(clientRxDesc, prometheus.CounterValue, float64(t.rx), id, k.cn)
		ch <- prometheus.MustNewConstMetric(clientTxDesc, prometheus.CounterValue, float64(t.tx), id, k.cn)
		ch <- prometheus.MustNewConstMetric(clientSinceDesc, prometheus.GaugeValue, float64(t.since.UnixNano())/1e9, id, k.cn)
	}
	for id, n := range clients {
		ch <- prometheus.MustNewConstMetric(clientsDesc, prometheus.GaugeValue, float64(n), strconv.Itoa(id))
	}
}

// monitorHandler is what the server's metrics listener serves: the
// server's metrics (MetricsHandler), the per-client counters at
// /metrics/openvpn, all behind the monitoring token when it is set.
func monitorHandler(reg prometheus.Gatherer, sessions *Sessions, timeout time.Duration, token string) http.Handler {
	clients := prometheus.NewRegistry()
	clients.MustRegister(ClientCollector{Sessions: sessions})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics/openvpn", promhttp.HandlerFor(clients, promhttp.HandlerOpts{Timeout: timeout, ErrorHandling: promhttp.ContinueOnError}))
	mux.Handle("/", MetricsHandler(reg, timeout))
	return RequireMonitorToken(token, mux)
}
