package subnet

import (
	"encoding/json"
	"fmt"
	"net/netip"
)

// MaxPort is the highest TCP or UDP port.
const MaxPort = 65535

// Ports says how an instance's ports derive from its 1-indexed id. The zero
// value gives every port as 0+id, which is rarely what is wanted; the
// reference deployment uses [ReferencePorts].
// ReferencePorts are the reference deployment's base ports.
var ReferencePorts = Ports{VPN: 10000, Management: 20000, API: 30000}

type Ports struct {
	// VPN is the base of the OpenVPN ports: instance id listens on VPN+id.
	VPN int
	// Management is the base of the management ports: instance id's
	// management interface listens on Management+id.
	Management int
	// API is the internal API port. With SharedAPI false (the reference
	// system's old layout, VPN_API_BASE_PORT) instance id's internal API
	// listens on API+id; with SharedAPI true (VPN_API_PORT) one internal API
	// on port API serves every instance.
	API       int
	SharedAPI bool
}

// Plan is the address and port plan of a deployment: the base prefix, the
// instance prefix length, an optional fixed gateway, the ports and the
// number of instances that run. A Plan is a comparable value; the zero Plan
// is not valid. Check a Plan built by hand with [Plan.Validate].
type Plan struct {
	// Base is the prefix that all instance subnets are cut from, such as
	// 10.240.0.0/12 (VPN_BASE_SUBNET). It must be IPv4 without host bits.
	Base netip.Prefix
	// Bits is the instance prefix length, such as 20
	// (VPN_INSTANCE_SUBNET_BITMASK), from Base.Bits() to [MaxBits]. It is
	// used as is; apply [ClampBits] or [DefaultBits] before.
	Bits int
	// Gateway, if valid, is the server end of every instance's
	// point-to-point link (BALENA_VPN_GATEWAY or VPN_GATEWAY). The zero
	// Addr means each instance's first usable address.
	Gateway netip.Addr
	// Ports are the base ports.
	Ports Ports
	// Instances is how many instances run (VPN_INSTANCE_COUNT), from 1 to
	// the number of instance subnets. Zero means every instance subnet.
	Instances int
}

// Instance is the plan of one OpenVPN instance.
type Instance struct {
	ID             int          // 1-indexed instance id
	Subnet         netip.Prefix // the instance subnet
	Gateway        netip.Addr   // server end of the point-to-point link
	Peer           netip.Addr   // second usable address: the link's peer
	PoolFirst      netip.Addr   // third usable address: first in the pool
	PoolLast       netip.Addr   // last usable address: last in the pool
	Port           int          // OpenVPN port
	ManagementPort int          // management interface port (on 127.0.0.1)
	APIPort        int          // internal API port
	MaxClients     int          // pool size: PoolFirst…PoolLast
}

// Count returns the number of instance subnets the plan's base holds, which
// can be more than the number of instances that run ([Plan.Len]).
func (p Plan) Count() (int, error) {
	return Count(p.Base, p.Bits)
}

// Len returns the number of instances that run: p.Instances, or every
// instance subnet when that is zero.
func (p Plan) Len() (int, error) {
	n, err := p.Count()
	if err != nil {
		return 0, err
	}
	if p.Instances == 0 {
		return n, nil
	}
	return p.Instances, nil
}

// MaxClients returns how many devices the running instances can hold
// together: the pool size of one instance times [Plan.Len].
func (p Plan) MaxClients() (int, error) {
	n, err := p.Len()
	if err != nil {
		return 0, err
	}
	return n * poolSize(p.Bits), nil
}

// Validate reports whether the plan can be served: a valid base and prefix
// length, an IPv4 gateway if one is set, an instance count that the base
// holds, and ports that stay within 1…65535 for every running instance.
func (p Plan) Validate() error {
	n, err := p.Count()
	if err != nil {
		return err
	}
	if p.Gateway.IsValid() && !p.Gateway.Is4() {
		return fmt.Errorf("gateway %s: %w", p.Gateway, ErrNotIPv4)
	}
	if p.Instances < 0 || p.Instances > n {
		return fmt.Errorf("%d instances: %w: %s at /%d has room for 1…%d", p.Instances, ErrOutOfRange, p.Base, p.Bits, n)
	}
	last := p.Instances
	if last == 0 {
		last = n
	}
	// Ports grow with the id, so the first and the last instance bound them.
	if err := p.Ports.check(1); err != nil {
		return err
	}
	return p.Ports.check(last)
}

// Instance returns the plan of instance id (1-indexed). It is an error
// wrapping [ErrOutOfRange] when id names no instance subnet of the base or
// when one of its ports falls outside 1…65535. Instance does not check id
// against p.Instances, so that a plan can describe every subnet of its base.
func (p Plan) Instance(id int) (Instance, error) {
	sub, err := Nth(p.Base, p.Bits, id)
	if err != nil {
		return Instance{}, err
	}
	if p.Gateway.IsValid() && !p.Gateway.Is4() {
		return Instance{}, fmt.Errorf("gateway %s: %w", p.Gateway, ErrNotIPv4)
	}
	if err := p.Ports.check(id); err != nil {
		return Instance{}, err
	}
	network := Uint32(sub.Addr())
	size := uint32(1) << (32 - p.Bits) // 8 or more, since Bits ≤ 29
	in := Instance{
		ID:             id,
		Subnet:         sub,
		Gateway:        AddrFromUint32(network + 1),
		Peer:           AddrFromUint32(network + 2),
		PoolFirst:      AddrFromUint32(network + 3),
		PoolLast:       AddrFromUint32(network + size - 2),
		Port:           p.Ports.VPN + id,
		ManagementPort: p.Ports.Management + id,
		APIPort:        p.Ports.api(id),
		MaxClients:     poolSize(p.Bits),
	}
	if p.Gateway.IsValid() {
		in.Gateway = p.Gateway
	}
	return in, nil
}

// All returns the plan of every running instance, 1…[Plan.Len].
func (p Plan) All() ([]Instance, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	n, _ := p.Len()
	out := make([]Instance, n)
	for i := range out {
		in, err := p.Instance(i + 1)
		if err != nil {
			return nil, err
		}
		out[i] = in
	}
	return out, nil
}

// String returns a one-line summary such as
// "10.240.0.0/12 at /20: 2 of 256 instances, 4092 clients each".
func (p Plan) String() string {
	n, err := p.Count()
	if err != nil {
		return fmt.Sprintf("invalid plan: %v", err)
	}
	run, _ := p.Len()
	return fmt.Sprintf("%s at /%d: %d of %d instances, %d clients each", p.Base, p.Bits, run, n, poolSize(p.Bits))
}

func (pp Ports) api(id int) int {
	if pp.SharedAPI {
		return pp.API
	}
	return pp.API + id
}

// check reports whether instance id's ports are within 1…65535.
func (pp Ports) check(id int) error {
	for _, c := range [...]struct {
		name string
		port int
	}{
		{"VPN", pp.VPN + id},
		{"management", pp.Management + id},
		{"API", pp.api(id)},
	} {
		if c.port < 1 || c.port > MaxPort {
			return fmt.Errorf("instance %d: %s port %d: %w: ports are 1…%d", id, c.name, c.port, ErrOutOfRange, MaxPort)
		}
	}
	return nil
}

// poolSize is the number of pool addresses in an instance subnet of
// length bits (≤ MaxBits).
func poolSize(bits int) int {
	return 1<<(32-bits) - reserved
}

// instanceJSON is the wire form of Instance, with the keys that
// "obvpnctl plan --json" documents.
type instanceJSON struct {
	ID             int          `json:"id"`
	Subnet         netip.Prefix `json:"subnet"`
	Gateway        netip.Addr   `json:"gateway"`
	Peer           netip.Addr   `json:"peer"`
	PoolFirst      netip.Addr   `json:"pool_first"`
	PoolLast       netip.Addr   `json:"pool_last"`
	Port           int          `json:"port"`
	ManagementPort int          `json:"management_port"`
	APIPort        int          `json:"api_port"`
	MaxClients     int          `json:"max_clients"`
}

// MarshalJSON encodes the instance with snake_case keys: id, subnet,
// gateway, peer, pool_first, pool_last, port, management_port, api_port and
// max_clients.
func (in Instance) MarshalJSON() ([]byte, error) {
	return json.Marshal(instanceJSON(in))
}

// UnmarshalJSON decodes what [Instance.MarshalJSON] encodes.
func (in *Instance) UnmarshalJSON(b []byte) error {
	var j instanceJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*in = Instance(j)
	return nil
}
