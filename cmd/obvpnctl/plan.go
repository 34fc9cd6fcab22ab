package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/obvpn/obvpn/subnet"
	"github.com/obvpn/obvpn/vpn"
)

// planJSON is the head of "plan --json"; the instances follow it one per
// line, so that --all on a large base is streamed rather than built in
// memory.
type planJSON struct {
	Base         string `json:"base"`
	InstanceBits int    `json:"instance_bits"`
}

func runPlan(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asJSON := fs.Bool("json", false, "print JSON: {\"base\",\"instance_bits\",\"instances\":[…]}")
	all := fs.Bool("all", false, "list every instance subnet of the base, not only the configured instances")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: obvpnctl plan [--json] [--all]")
		fmt.Fprintln(stderr, "\nPrints the address and port plan of the deployment that the environment")
		fmt.Fprintln(stderr, "configures (VPN_BASE_SUBNET, VPN_INSTANCE_SUBNET_BITMASK, VPN_INSTANCE_COUNT,")
		fmt.Fprintln(stderr, "VPN_GATEWAY, VPN_BASE_PORT, VPN_BASE_MANAGEMENT_PORT, VPN_API_PORT, …).")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	plan, err := vpn.LoadPlan()
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl plan: %v\n", err)
		return 2
	}
	n, _ := plan.Len()
	if *all {
		n, _ = plan.Count()
	}
	// Every instance first, so that an instance out of range (with --all,
	// ports that fit the configured count may not fit every subnet)
	// prints nothing but the error.
	instances := make([]subnet.Instance, n)
	for i := range instances {
		if instances[i], err = plan.Instance(i + 1); err != nil {
			fmt.Fprintf(stderr, "obvpnctl plan: %v\n", err)
			return 1
		}
	}
	w := bufio.NewWriter(stdout)
	if *asJSON {
		err = writePlanJSON(w, plan, instances)
	} else {
		err = writePlanTable(w, plan, instances)
	}
	if err == nil {
		err = w.Flush()
	}
	if err != nil {
		fmt.Fprintf(stderr, "obvpnctl plan: %v\n", err)
		return 1
	}
	return 0
}

func writePlanJSON(w io.Writer, plan subnet.Plan, instances []subnet.Instance) error {
	head, err := json.Marshal(planJSON{Base: plan.Base.String(), InstanceBits: plan.Bits})
	if err != nil {
		return err
	}
	// {"base":…,"instance_bits":…} becomes {"base":…,"instance_bits":…,"instances":[
	fmt.Fprintf(w, "%s,\"instances\":[", head[:len(head)-1])
	for i, in := range instances {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		sep := ","
		if i == len(instances)-1 {
			sep = ""
		}
		if _, err := fmt.Fprintf(w, "\n%s%s", b, sep); err != nil {
			return err
		}
	}
	_, err = fmt.Fprint(w, "\n]}\n")
	return err
}

func writePlanTable(w io.Writer, plan subnet.Plan, instances []subnet.Instance) error {
	total, _ := plan.MaxClients()
	fmt.Fprintf(w, "%s; %d clients in all\n", plan, total)
	if plan.Gateway.IsValid() {
		fmt.Fprintf(w, "gateway %s for every instance\n", plan.Gateway)
	}
	if plan.Ports.SharedAPI {
		fmt.Fprintf(w, "internal API on port %d for every instance\n", plan.Ports.API)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSUBNET\tGATEWAY\tPEER\tPOOL\tPORT\tMGMT\tAPI\tMAX CLIENTS")
	for _, in := range instances {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s-%s\t%d\t%d\t%d\t%d\n", in.ID, in.Subnet, in.Gateway, in.Peer,
			in.PoolFirst, in.PoolLast, in.Port, in.ManagementPort, in.APIPort, in.MaxClients)
	}
	return tw.Flush()
}
