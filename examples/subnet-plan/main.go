// Command subnet-plan shows how package subnet turns a base prefix, an
// instance prefix length and an instance count into the address and port
// plan of a deployment: each instance's subnet, gateway, point-to-point
// peer, address pool and ports. It prints the plan as a table, or as JSON.
//
//	subnet-plan                                 # 10.240.0.0/12, 4 instances
//	subnet-plan -bits 20 -count 2               # the seed's /20s
//	subnet-plan -base 100.64.0.0/10 -count 8 -json
//
// The ports are the reference deployment's bases: OpenVPN on 10000+id,
// management on 20000+id, the internal API on 30000+id.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"text/tabwriter"

	"github.com/obvpn/obvpn/subnet"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("subnet-plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	base := fs.String("base", "10.240.0.0/12", "the IPv4 prefix that the instance subnets are cut from")
	bits := fs.Int("bits", 0, "the instance prefix length (at least 16); 0 derives it from -count")
	count := fs.Int("count", 4, "how many instances run; 0 means every instance subnet of the base")
	asJSON := fs.Bool("json", false, "print the instances as a JSON array")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "subnet-plan: unexpected arguments %q\n", fs.Args())
		return 2
	}
	prefix, err := netip.ParsePrefix(*base)
	if err != nil {
		fmt.Fprintf(stderr, "subnet-plan: -base: %v\n", err)
		return 2
	}
	plan := subnet.Plan{
		Base:      prefix,
		Bits:      subnet.ClampBits(*bits), // OpenVPN takes no pool larger than a /16
		Ports:     subnet.Ports{VPN: 10000, Management: 20000, API: 30000},
		Instances: *count,
	}
	if *bits == 0 {
		plan.Bits = subnet.DefaultBits(prefix, *count)
	}
	if err := plan.Validate(); err != nil {
		fmt.Fprintf(stderr, "subnet-plan: %v\n", err)
		return 2
	}
	instances, err := plan.All()
	if err != nil {
		fmt.Fprintf(stderr, "subnet-plan: %v\n", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		err = enc.Encode(instances)
	} else {
		err = writeTable(stdout, plan, instances)
	}
	if err != nil {
		fmt.Fprintf(stderr, "subnet-plan: %v\n", err)
		return 1
	}
	return 0
}

// writeTable prints the plan's summary line and one row per instance.
func writeTable(w io.Writer, plan subnet.Plan, instances []subnet.Instance) error {
	fmt.Fprintln(w, plan)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSUBNET\tGATEWAY\tPEER\tPOOL\tPORT\tMGMT PORT\tMAX CLIENTS")
	for _, in := range instances {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s-%s\t%d\t%d\t%d\n", in.ID, in.Subnet, in.Gateway,
			in.Peer, in.PoolFirst, in.PoolLast, in.Port, in.ManagementPort, in.MaxClients)
	}
	return tw.Flush()
}
