package deploy

import (
	"encoding/json"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/obvpn/obvpn/connectproxy"
	"github.com/obvpn/obvpn/vpn"
)

// The part of Grafana's dashboard JSON model these tests read.
type grafanaDashboard struct {
	Title         string `json:"title"`
	UID           string `json:"uid"`
	SchemaVersion int    `json:"schemaVersion"`
	Panels        []grafanaPanel
	Templating    struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Definition string          `json:"definition"`
			Datasource *grafanaDS      `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type grafanaPanel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource *grafanaDS     `json:"datasource"`
	Panels     []grafanaPanel `json:"panels"` // a collapsed row's
	GridPos    struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		RefID      string     `json:"refId"`
		Expr       string     `json:"expr"`
		Datasource *grafanaDS `json:"datasource"`
	} `json:"targets"`
}

type grafanaDS struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// metricName finds the metric names in a PromQL expression: identifiers
// that start with vpn_ (not inside another identifier).
var metricName = regexp.MustCompile(`(?:^|[^A-Za-z0-9_:])(vpn_[a-z_]+)`)

// registeredMetrics is every metric family the server exposes, by name, with
// its type: the collectors of vpn.NewMetrics and connectproxy.NewMetrics,
// gathered from a registry as a scrape would see them.
func registeredMetrics(t *testing.T) map[string]string {
	t.Helper()
	reg := prometheus.NewRegistry()
	if _, err := vpn.NewMetrics(reg); err != nil {
		t.Fatal(err)
	}
	if _, err := connectproxy.NewMetrics(reg); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]string)
	for _, mf := range mfs {
		out[mf.GetName()] = mf.GetType().String()
	}
	return out
}

// TestDashboard checks grafana-dashboard.json: a Grafana dashboard whose
// panels query a Prometheus data source chosen with a templating variable,
// and whose expressions name only metrics the server registers, used as
// their type allows (a histogram through _bucket, _sum or _count,
// _bucket through histogram_quantile, a counter through rate or increase);
// and every registered metric is on it.
func TestDashboard(t *testing.T) {
	var d grafanaDashboard
	if err := json.Unmarshal(readFile(t, dashboardPath), &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	if d.Title == "" || d.UID == "" || d.SchemaVersion == 0 {
		t.Errorf("title %q, uid %q, schemaVersion %d: want all three", d.Title, d.UID, d.SchemaVersion)
	}

	dsVar := ""
	var exprs []string // every query, with where it is
	where := make(map[string]string)
	for _, v := range d.Templating.List {
		var q string
		_ = json.Unmarshal(v.Query, &q)
		if v.Type == "datasource" && q == "prometheus" {
			dsVar = v.Name
		}
	}
	if dsVar == "" {
		t.Fatal("templating: no variable of type datasource with query prometheus")
	}
	dsRef := "${" + dsVar + "}"
	checkDS := func(what string, ds *grafanaDS) {
		t.Helper()
		if ds == nil || ds.Type != "prometheus" || ds.UID != dsRef {
			t.Errorf("%s: datasource %+v, want {prometheus %s}", what, ds, dsRef)
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		checkDS("variable "+v.Name, v.Datasource)
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			t.Errorf("variable %s: query: %v", v.Name, err)
		}
		for _, e := range []string{q.Query, v.Definition} {
			if e != "" {
				exprs = append(exprs, e)
				where[e] = "variable " + v.Name
			}
		}
	}

	ids := make(map[int]string)
	var walk func(ps []grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			what := "panel " + p.Title
			if prev, ok := ids[p.ID]; ok || p.ID == 0 {
				t.Errorf("%s: id %d not unique (also %s)", what, p.ID, prev)
			}
			ids[p.ID] = p.Title
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
				t.Errorf("%s: gridPos %+v outside the 24-column grid", what, g)
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			checkDS(what, p.Datasource)
			if len(p.Targets) == 0 {
				t.Errorf("%s: no targets", what)
			}
			refs := make(map[string]bool)
			for _, tg := range p.Targets {
				if tg.Expr == "" || tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("%s: target %q: want an expr and a unique refId", what, tg.RefID)
				}
				refs[tg.RefID] = true
				if tg.Datasource != nil {
					checkDS(what+" target "+tg.RefID, tg.Datasource)
				}
				exprs = append(exprs, tg.Expr)
				where[tg.Expr] = what
			}
		}
	}
	walk(d.Panels)

	metrics := registeredMetrics(t)
	used := make(map[string]bool)
	for _, e := range exprs {
		for _, m := range metricName.FindAllStringSubmatch(e, -1) {
			name := m[1]
			family, typ := name, metrics[name]
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(name, suffix); typ == "" && ok && metrics[base] == "HISTOGRAM" {
					family, typ = base, "HISTOGRAM"
					if suffix == "_bucket" && !strings.Contains(e, "histogram_quantile(") {
						t.Errorf("%s: %s outside histogram_quantile: %s", where[e], name, e)
					}
				}
			}
			switch {
			case typ == "":
				t.Errorf("%s: %s is not a metric the server registers: %s", where[e], name, e)
			case typ == "HISTOGRAM" && family == name:
				t.Errorf("%s: %s is a histogram: query %s_bucket, _sum or _count: %s", where[e], name, name, e)
			case typ == "COUNTER" && !strings.Contains(e, "rate(") && !strings.Contains(e, "increase("):
				t.Errorf("%s: counter %s without rate or increase: %s", where[e], name, e)
			}
			used[family] = true
		}
	}
	for _, name := range slices.Sorted(maps.Keys(metrics)) {
		if !used[name] {
			t.Errorf("%s (%s) is on no panel", name, metrics[name])
		}
	}
}
