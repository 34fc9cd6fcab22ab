package subnet

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

var seedPorts = Ports{VPN: 10000, Management: 20000, API: 30000}

func TestPlanInstance(t *testing.T) {
	tests := []struct {
		name string
		plan Plan
		id   int
		want Instance
	}{
		{
			name: "seed first",
			plan: Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts},
			id:   1,
			want: Instance{ID: 1, Subnet: netip.MustParsePrefix("10.240.0.0/20"),
				Gateway: netip.MustParseAddr("10.240.0.1"), Peer: netip.MustParseAddr("10.240.0.2"),
				PoolFirst: netip.MustParseAddr("10.240.0.3"), PoolLast: netip.MustParseAddr("10.240.15.254"),
				Port: 10001, ManagementPort: 20001, APIPort: 30001, MaxClients: 4092},
		},
		{
			name: "seed second",
			plan: Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts},
			id:   2,
			want: Instance{ID: 2, Subnet: netip.MustParsePrefix("10.240.16.0/20"),
				Gateway: netip.MustParseAddr("10.240.16.1"), Peer: netip.MustParseAddr("10.240.16.2"),
				PoolFirst: netip.MustParseAddr("10.240.16.3"), PoolLast: netip.MustParseAddr("10.240.31.254"),
				Port: 10002, ManagementPort: 20002, APIPort: 30002, MaxClients: 4092},
		},
		{
			name: "seed last",
			plan: Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts},
			id:   256,
			want: Instance{ID: 256, Subnet: netip.MustParsePrefix("10.255.240.0/20"),
				Gateway: netip.MustParseAddr("10.255.240.1"), Peer: netip.MustParseAddr("10.255.240.2"),
				PoolFirst: netip.MustParseAddr("10.255.240.3"), PoolLast: netip.MustParseAddr("10.255.255.254"),
				Port: 10256, ManagementPort: 20256, APIPort: 30256, MaxClients: 4092},
		},
		{
			name: "cgnat last, fixed gateway, shared API port",
			plan: Plan{Base: netip.MustParsePrefix("100.64.0.0/10"), Bits: 20,
				Gateway: netip.MustParseAddr("100.64.0.1"),
				Ports:   Ports{VPN: 1000, Management: 2000, API: 3000, SharedAPI: true}},
			id: 1024,
			want: Instance{ID: 1024, Subnet: netip.MustParsePrefix("100.127.240.0/20"),
				Gateway: netip.MustParseAddr("100.64.0.1"), Peer: netip.MustParseAddr("100.127.240.2"),
				PoolFirst: netip.MustParseAddr("100.127.240.3"), PoolLast: netip.MustParseAddr("100.127.255.254"),
				Port: 2024, ManagementPort: 3024, APIPort: 3000, MaxClients: 4092},
		},
		{
			name: "smallest subnet",
			plan: Plan{Base: netip.MustParsePrefix("192.0.2.0/24"), Bits: 29, Ports: seedPorts},
			id:   2,
			want: Instance{ID: 2, Subnet: netip.MustParsePrefix("192.0.2.8/29"),
				Gateway: netip.MustParseAddr("192.0.2.9"), Peer: netip.MustParseAddr("192.0.2.10"),
				PoolFirst: netip.MustParseAddr("192.0.2.11"), PoolLast: netip.MustParseAddr("192.0.2.14"),
				Port: 10002, ManagementPort: 20002, APIPort: 30002, MaxClients: 4},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.plan.Instance(tt.id)
			if err != nil {
				t.Fatalf("Instance(%d): %v", tt.id, err)
			}
			if got != tt.want {
				t.Errorf("Instance(%d)\n got %+v\nwant %+v", tt.id, got, tt.want)
			}
		})
	}
}

func TestPlanValidate(t *testing.T) {
	base := netip.MustParsePrefix("10.240.0.0/12")
	tests := []struct {
		name   string
		plan   Plan
		target error
		text   string
	}{
		{name: "ok", plan: Plan{Base: base, Bits: 20, Ports: seedPorts, Instances: 4}},
		{name: "all ok", plan: Plan{Base: base, Bits: 20, Ports: seedPorts}},
		{name: "too many instances", plan: Plan{Base: base, Bits: 20, Ports: seedPorts, Instances: 257},
			target: ErrOutOfRange, text: "257 instances: out of range: 10.240.0.0/12 at /20 has room for 1…256"},
		{name: "negative instances", plan: Plan{Base: base, Bits: 20, Ports: seedPorts, Instances: -1}, target: ErrOutOfRange},
		{name: "port overflow for the last instance", plan: Plan{Base: base, Bits: 20, Instances: 2,
			Ports: Ports{VPN: 65534, Management: 20000, API: 30000}},
			target: ErrOutOfRange, text: "instance 2: VPN port 65536: out of range: ports are 1…65535"},
		{name: "management overflow in all", plan: Plan{Base: base, Bits: 20,
			Ports: Ports{VPN: 1000, Management: 65400, API: 30000}}, target: ErrOutOfRange},
		{name: "API port zero shared", plan: Plan{Base: base, Bits: 20, Instances: 1,
			Ports: Ports{VPN: 1000, Management: 2000, SharedAPI: true}}, target: ErrOutOfRange},
		{name: "ipv6 gateway", plan: Plan{Base: base, Bits: 20, Ports: seedPorts, Gateway: netip.MustParseAddr("fd00::1")},
			target: ErrNotIPv4},
		{name: "zero plan", plan: Plan{}, target: ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.plan.Validate()
			if tt.target == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				if _, err := tt.plan.All(); err != nil {
					t.Fatalf("All: %v", err)
				}
				return
			}
			if !errors.Is(err, tt.target) {
				t.Fatalf("Validate = %v, want %v", err, tt.target)
			}
			if tt.text != "" && err.Error() != tt.text {
				t.Errorf("Validate = %q, want %q", err, tt.text)
			}
			if _, err := tt.plan.All(); err == nil {
				t.Errorf("All succeeded on an invalid plan")
			}
		})
	}
}

func TestPlanInstanceErrors(t *testing.T) {
	p := Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: Ports{VPN: 65500, Management: 1, API: 1}, Instances: 2}
	if _, err := p.Instance(0); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Instance(0): %v", err)
	}
	if _, err := p.Instance(257); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("Instance(257): %v", err)
	}
	if _, err := p.Instance(36); !errors.Is(err, ErrOutOfRange) || !strings.Contains(err.Error(), "VPN port 65536") {
		t.Errorf("Instance(36) with VPN base 65500: %v", err)
	}
	// Instance describes subnets beyond the running instances too.
	if in, err := p.Instance(3); err != nil || in.Subnet.String() != "10.240.32.0/20" {
		t.Errorf("Instance(3) = %v, %v", in, err)
	}
}

func TestPlanTotals(t *testing.T) {
	p := Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts, Instances: 4}
	if n, err := p.Count(); n != 256 || err != nil {
		t.Errorf("Count = %d, %v", n, err)
	}
	if n, err := p.Len(); n != 4 || err != nil {
		t.Errorf("Len = %d, %v", n, err)
	}
	if n, err := p.MaxClients(); n != 4*4092 || err != nil {
		t.Errorf("MaxClients = %d, %v", n, err)
	}
	if s := p.String(); s != "10.240.0.0/12 at /20: 4 of 256 instances, 4092 clients each" {
		t.Errorf("String = %q", s)
	}
	p.Instances = 0
	if n, _ := p.Len(); n != 256 {
		t.Errorf("Len with Instances 0 = %d, want 256", n)
	}
	if s := (Plan{}).String(); !strings.HasPrefix(s, "invalid plan: ") {
		t.Errorf("zero Plan String = %q", s)
	}
}

func TestInstanceJSON(t *testing.T) {
	p := Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts}
	in, err := p.Instance(1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"id":1,"subnet":"10.240.0.0/20","gateway":"10.240.0.1","peer":"10.240.0.2",` +
		`"pool_first":"10.240.0.3","pool_last":"10.240.15.254","port":10001,"management_port":20001,` +
		`"api_port":30001,"max_clients":4092}`
	if string(b) != want {
		t.Errorf("JSON\n got %s\nwant %s", b, want)
	}
	var back Instance
	if err := json.Unmarshal(b, &back); err != nil || back != in {
		t.Errorf("round trip: %+v, %v", back, err)
	}
	if err := json.Unmarshal([]byte(`{"subnet":"nonsense"}`), &back); err == nil {
		t.Errorf("no error for a bad subnet")
	}
}

func TestInstanceAllocs(t *testing.T) {
	p := Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := p.Instance(77); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("Instance allocates %v times per call, want 0", allocs)
	}
}

func BenchmarkInstance(b *testing.B) {
	p := Plan{Base: netip.MustParsePrefix("10.240.0.0/12"), Bits: 20, Ports: seedPorts}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, err := p.Instance(i%256 + 1); err != nil {
			b.Fatal(err)
		}
	}
}
