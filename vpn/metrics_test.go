package vpn

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/matryer/is"
	"github.com/prometheus/client_golang/prometheus"
)

func TestMetrics(t *testing.T) {
	is := is.New(t)
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	is.NoErr(err)
	_, err = NewMetrics(reg)
	is.True(err != nil) // the names are taken
	_, err = NewMetrics(nil)
	is.NoErr(err)

	m.OnlineDevices.Set(2)
	m.Devices.Add(3)
	m.AuthFailures.Inc()
	m.RxBytes.Add(1000)
	m.SessionEnded(90 * time.Second)
	m.DeviceRate(uuidA, 10*1024, 0) // 10 kbit/s in, nothing out, observed at the scrape

	srv := httptest.NewServer(MetricsHandler(reg, time.Second))
	defer srv.Close()
	for _, path := range []string{"/cluster_metrics", "/metrics"} {
		resp, err := srv.Client().Get(srv.URL + path)
		is.NoErr(err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		text := string(b)
		for _, want := range []string{
			"vpn_online_devices 2\n",
			"vpn_devices_total 3\n",
			"vpn_auth_failures_total 1\n",
			"vpn_rx_bytes_total 1000\n",
			"vpn_tx_bytes_total 0\n",
			`vpn_session_duration_bucket{le="60"} 0` + "\n",
			`vpn_session_duration_bucket{le="300"} 1` + "\n",
			`vpn_session_duration_bucket{le="604800"} 1` + "\n",
			`vpn_session_avg_rx_bitrate_bucket{le="7680"} 0` + "\n",
			`vpn_session_avg_rx_bitrate_bucket{le="10240"} 1` + "\n",
			`vpn_session_avg_tx_bitrate_bucket{le="1024"} 1` + "\n",
			`vpn_session_avg_rx_bitrate_bucket{le="1.048576e+08"} 1` + "\n",
		} {
			if !strings.Contains(text, want) {
				t.Errorf("%s lacks %q", path, want)
			}
		}
	}
	resp, err := srv.Client().Get(srv.URL + "/ping")
	is.NoErr(err)
	b, _ := io.ReadAll(resp.Body)
	is.Equal(string(b), "OK")
	is.Equal(len(SessionDurationBuckets), 8)
	is.Equal(len(BitrateBuckets), 31)
}
