package vpn

import (
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the server's Prometheus collectors (SPEC §9), under the
// reference system's names. The proxy's tunnel metrics belong to package
// connectproxy and go on the same registry.
type Metrics struct {
	OnlineDevices   prometheus.Gauge     // vpn_online_devices
	Devices         prometheus.Counter   // vpn_devices_total
	AuthFailures    prometheus.Counter   // vpn_auth_failures_total
	RxBytes         prometheus.Counter   // vpn_rx_bytes_total
	TxBytes         prometheus.Counter   // vpn_tx_bytes_total
	SessionDuration prometheus.Histogram // vpn_session_duration, seconds
	SessionRxRate   prometheus.Histogram // vpn_session_avg_rx_bitrate, bits/s
	SessionTxRate   prometheus.Histogram // vpn_session_avg_tx_bitrate, bits/s

	rates deviceRates // the rates measured since the last scrape, by device
}

// deviceRates collects each device's bitrates between two scrapes. At a
// scrape, every device measured since the one before is observed once, with
// the mean of its rates, in the bitrate histograms: as the reference does,
// so that long-lived sessions show while they live. The reference then
// resets its histograms; these stay cumulative, as Prometheus histograms
// must for rate() and for several scrapers, and
// histogram_quantile(q, rate(vpn_session_avg_rx_bitrate_bucket[i])) gives
// the reference's per-interval view. A device's entry lives until the next
// scrape, so the map holds at most one entry per device of the fleet.
type deviceRates struct {
	mu sync.Mutex
	by map[string]*rateSum
}

type rateSum struct {
	rx, tx float64 // sums of the rates, bits/s
	n      int
}

// DeviceRate records that device uuid moved rx and tx bits per second on
// average over a stretch of its session (between two BYTECOUNT_CLI, or up
// to its end). The next scrape observes each device's mean rate once.
func (m *Metrics) DeviceRate(uuid string, rx, tx float64) {
	r := &m.rates
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.by == nil {
		r.by = make(map[string]*rateSum)
	}
	s := r.by[uuid]
	if s == nil {
		s = &rateSum{}
		r.by[uuid] = s
	}
	s.rx += rx
	s.tx += tx
	s.n++
}

// observeRates moves the rates recorded since the last scrape into the
// histograms, one observation per device.
func (m *Metrics) observeRates() {
	r := &m.rates
	r.mu.Lock()
	by := r.by
	r.by = nil
	r.mu.Unlock()
	for _, s := range by {
		m.SessionRxRate.Observe(s.rx / float64(s.n))
		m.SessionTxRate.Observe(s.tx / float64(s.n))
	}
}

// rateCollector is the bitrate histograms as one collector that observes
// the pending rates when it is scraped.
type rateCollector struct{ m *Metrics }

func (c rateCollector) Describe(ch chan<- *prometheus.Desc) {
	c.m.SessionRxRate.Describe(ch)
	c.m.SessionTxRate.Describe(ch)
}

func (c rateCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.observeRates()
	c.m.SessionRxRate.Collect(ch)
	c.m.SessionTxRate.Collect(ch)
}

// SessionDurationBuckets are the buckets of vpn_session_duration: 1 min,
// 5 min, 15 min, 1 h, 6 h, 12 h, 1 day and 1 week, in seconds.
var SessionDurationBuckets = []float64{60, 300, 900, 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400}

// BitrateBuckets are the buckets of the session bitrate histograms, in bits
// per second: 1 kbit/s to 100 Mbit/s in the reference system's steps
// (1 k = 1024).
var BitrateBuckets = func() []float64 {
	const k, m = 1 << 10, 1 << 20
	b := []float64{k, 2.5 * k, 5 * k, 7.5 * k, 10 * k, 15 * k, 20 * k, 25 * k, 50 * k, 100 * k, 250 * k, 500 * k}
	for _, n := range []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 35, 40, 45, 50, 100} {
		b = append(b, n*m)
	}
	return b
}()

// NewMetrics creates the collectors and registers them on reg; a nil reg
// registers them nowhere. It fails when reg already holds collectors of
// these names.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		OnlineDevices: prometheus.NewGauge(prometheus.GaugeOpts{Name: "vpn_online_devices", Help: "VPN devices online now."}),
		Devices:       prometheus.NewCounter(prometheus.CounterOpts{Name: "vpn_devices_total", Help: "VPN device sessions since start."}),
		AuthFailures:  prometheus.NewCounter(prometheus.CounterOpts{Name: "vpn_auth_failures_total", Help: "VPN device authentication failures since start."}),
		RxBytes:       prometheus.NewCounter(prometheus.CounterOpts{Name: "vpn_rx_bytes_total", Help: "Bytes received from devices."}),
		TxBytes:       prometheus.NewCounter(prometheus.CounterOpts{Name: "vpn_tx_bytes_total", Help: "Bytes sent to devices."}),
		SessionDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vpn_session_duration",
			Help: "Duration of VPN sessions, in seconds.", Buckets: SessionDurationBuckets}),
		SessionRxRate: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vpn_session_avg_rx_bitrate",
			Help: "Mean receive bitrate of each device between two scrapes, in bits per second.", Buckets: BitrateBuckets}),
		SessionTxRate: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "vpn_session_avg_tx_bitrate",
			Help: "Mean transmit bitrate of each device between two scrapes, in bits per second.", Buckets: BitrateBuckets}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.OnlineDevices, m.Devices, m.AuthFailures, m.RxBytes, m.TxBytes,
			m.SessionDuration, rateCollector{m}} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// SessionEnded records the duration of a finished session. Its bitrates
// are recorded as it goes, with [Metrics.DeviceRate]; byte counts are
// counted as they arrive (BYTECOUNT_CLI) or, with byte counting off, from
// the disconnect's totals.
func (m *Metrics) SessionEnded(d time.Duration) {
	m.SessionDuration.Observe(d.Seconds())
}

// MetricsHandler serves the metrics of g in Prometheus' text format at
// /cluster_metrics (the reference system's path) and /metrics, and answers
// /ping with 200 "OK". A scrape that takes longer than timeout is
// answered 503; zero means no limit.
func MetricsHandler(g prometheus.Gatherer, timeout time.Duration) http.Handler {
	metrics := promhttp.HandlerFor(g, promhttp.HandlerOpts{Timeout: timeout, ErrorHandling: promhttp.ContinueOnError})
	mux := http.NewServeMux()
	mux.Handle("GET /cluster_metrics", metrics)
	mux.Handle("GET /metrics", metrics)
	mux.HandleFunc("GET /ping", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "OK") })
	return mux
}
