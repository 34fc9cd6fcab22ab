package connectproxy

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the proxy's Prometheus collectors, under the reference
// system's names (SPEC §9).
type Metrics struct {
	// ActiveTunnels is vpn_proxy_active_tunnels: tunnels open now.
	ActiveTunnels prometheus.Gauge
	// TotalTunnels is vpn_proxy_total_tunnels: tunnels opened since start.
	TotalTunnels prometheus.Counter
	// TunnelErrors is vpn_proxy_tunnel_errors: tunnels that failed, to be
	// set up after the request was allowed (the device or the peer could
	// not be reached or refused) or while open (a connection broke).
	TunnelErrors prometheus.Counter
}

// NewMetrics creates the collectors and registers them on reg; a nil reg
// registers them nowhere. It fails when reg already holds collectors of
// these names.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		ActiveTunnels: prometheus.NewGauge(prometheus.GaugeOpts{Name: "vpn_proxy_active_tunnels", Help: "Current tunnels to VPN devices."}),
		TotalTunnels:  prometheus.NewCounter(prometheus.CounterOpts{Name: "vpn_proxy_total_tunnels", Help: "Running total of tunnels to VPN devices."}),
		TunnelErrors:  prometheus.NewCounter(prometheus.CounterOpts{Name: "vpn_proxy_tunnel_errors", Help: "Tunnels to VPN devices that failed."}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.ActiveTunnels, m.TotalTunnels, m.TunnelErrors} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (h *Handler) countError() {
	if h.Metrics != nil {
		h.Metrics.TunnelErrors.Inc()
	}
}
