package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/obvpn/obvpn/vpn"
	"github.com/obvpn/obvpn/vpn/haproxy"
)

// kinds is every kind the manifests may hold, with its apiVersion. Any
// other kind fails the tests: add it here, with its Go type, to use it.
var kinds = map[string]struct {
	apiVersion string
	new        func() any
}{
	"Deployment":          {"apps/v1", func() any { return new(appsv1.Deployment) }},
	"StatefulSet":         {"apps/v1", func() any { return new(appsv1.StatefulSet) }},
	"Service":             {"v1", func() any { return new(corev1.Service) }},
	"PodDisruptionBudget": {"policy/v1", func() any { return new(policyv1.PodDisruptionBudget) }},
	"ConfigMap":           {"v1", func() any { return new(corev1.ConfigMap) }},
	"Secret":              {"v1", func() any { return new(corev1.Secret) }},
}

// decodeDocument decodes one YAML document strictly into the Kubernetes
// API type of its kind: an unknown or misspelt field, a duplicate key, a
// value of the wrong type, an unknown kind or a wrong apiVersion is an
// error.
func decodeDocument(doc []byte) (any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	k, ok := kinds[tm.Kind]
	switch {
	case tm.Kind == "":
		return nil, errors.New("no kind")
	case !ok:
		return nil, fmt.Errorf("kind %q is not one these tests know", tm.Kind)
	case tm.APIVersion != k.apiVersion:
		return nil, fmt.Errorf("%s: apiVersion %q, want %q", tm.Kind, tm.APIVersion, k.apiVersion)
	}
	obj := k.new()
	if err := unmarshalStrict(doc, obj); err != nil {
		return nil, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj, nil
}

// unmarshalStrict decodes YAML into obj as the API server would decode
// what kubectl sends: converted to JSON without looking at obj's types (so
// 443 is a number, not the string "443"), then decoded with field names
// matched case-sensitively, and unknown and duplicate fields refused.
// (sigs.k8s.io/yaml's UnmarshalStrict converts scalars to the target's
// types and matches names without regard to case, as encoding/json does.)
func unmarshalStrict(doc []byte, obj any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strictErrs, err := sigsjson.UnmarshalStrict(j, obj)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

var documentSeparator = regexp.MustCompile(`(?m)^---[ \t]*(?:#.*)?$`)

// splitDocuments splits a multi-document YAML file, leaving out documents
// that hold only comments and blank lines.
func splitDocuments(data []byte) [][]byte {
	var docs [][]byte
	for _, doc := range documentSeparator.Split(string(data), -1) {
		for line := range strings.Lines(doc) {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				docs = append(docs, []byte(doc))
				break
			}
		}
	}
	return docs
}

// sourced is a decoded object with the file and document it came from.
type sourced[T any] struct {
	source string
	obj    T
}

// workload is a Deployment or a StatefulSet: what the tests need of it.
type workload struct {
	source, kind, name string
	selector           *metav1.LabelSelector
	template           *corev1.PodTemplateSpec
}

// manifests is every object in the Kubernetes manifests, by kind.
type manifests struct {
	workloads  []workload
	services   []sourced[*corev1.Service]
	pdbs       []sourced[*policyv1.PodDisruptionBudget]
	configMaps []sourced[*corev1.ConfigMap]
	secrets    []sourced[*corev1.Secret]
}

// loadManifests decodes every document of every .yaml, .yml and .json file
// under kubernetes/, its subfolders included.
func loadManifests(t *testing.T) *manifests {
	t.Helper()
	m := &manifests{}
	var errs []error
	err := filepath.WalkDir(manifestsDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		switch filepath.Ext(path) {
		case ".yaml", ".yml", ".json":
		default:
			return nil
		}
		data := readFile(t, path)
		for i, doc := range splitDocuments(data) {
			source := fmt.Sprintf("%s#%d", path, i+1)
			obj, err := decodeDocument(doc)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", source, err))
				continue
			}
			m.add(source, obj)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(errs) > 0 {
		t.Fatal(errors.Join(errs...))
	}
	return m
}

func (m *manifests) add(source string, obj any) {
	switch o := obj.(type) {
	case *appsv1.Deployment:
		m.workloads = append(m.workloads, workload{source, "Deployment", o.Name, o.Spec.Selector, &o.Spec.Template})
	case *appsv1.StatefulSet:
		m.workloads = append(m.workloads, workload{source, "StatefulSet", o.Name, o.Spec.Selector, &o.Spec.Template})
	case *corev1.Service:
		m.services = append(m.services, sourced[*corev1.Service]{source, o})
	case *policyv1.PodDisruptionBudget:
		m.pdbs = append(m.pdbs, sourced[*policyv1.PodDisruptionBudget]{source, o})
	case *corev1.ConfigMap:
		m.configMaps = append(m.configMaps, sourced[*corev1.ConfigMap]{source, o})
	case *corev1.Secret:
		m.secrets = append(m.secrets, sourced[*corev1.Secret]{source, o})
	default:
		panic(fmt.Sprintf("%s: %T not handled", source, obj))
	}
}

func (m *manifests) configMap(name string) *corev1.ConfigMap {
	for _, c := range m.configMaps {
		if c.obj.Name == name {
			return c.obj
		}
	}
	return nil
}

func (m *manifests) secret(name string) *corev1.Secret {
	for _, s := range m.secrets {
		if s.obj.Name == name {
			return s.obj
		}
	}
	return nil
}

// secretData is a Secret's values, data and stringData merged (stringData
// wins, as the API server does it).
func secretData(s *corev1.Secret) map[string]string {
	d := make(map[string]string)
	for k, v := range s.Data {
		d[k] = string(v)
	}
	for k, v := range s.StringData {
		d[k] = v
	}
	return d
}

func podContainers(spec *corev1.PodSpec) []*corev1.Container {
	var cs []*corev1.Container
	for i := range spec.InitContainers {
		cs = append(cs, &spec.InitContainers[i])
	}
	for i := range spec.Containers {
		cs = append(cs, &spec.Containers[i])
	}
	return cs
}

// containerEnv is the environment a container gets, as the kubelet builds
// it: the envFrom sources in order (a later one wins), then env. fromSecret
// holds the names whose values come from a Secret.
func (m *manifests) containerEnv(c *corev1.Container) (env map[string]string, fromSecret map[string]bool, err error) {
	env, fromSecret = make(map[string]string), make(map[string]bool)
	for _, ef := range c.EnvFrom {
		switch {
		case ef.ConfigMapRef != nil:
			cm := m.configMap(ef.ConfigMapRef.Name)
			if cm == nil {
				return nil, nil, fmt.Errorf("envFrom: no ConfigMap %q in the manifests", ef.ConfigMapRef.Name)
			}
			for k, v := range cm.Data {
				env[ef.Prefix+k] = v
				delete(fromSecret, ef.Prefix+k)
			}
		case ef.SecretRef != nil:
			s := m.secret(ef.SecretRef.Name)
			if s == nil {
				return nil, nil, fmt.Errorf("envFrom: no Secret %q in the manifests", ef.SecretRef.Name)
			}
			for k, v := range secretData(s) {
				env[ef.Prefix+k] = v
				fromSecret[ef.Prefix+k] = true
			}
		default:
			return nil, nil, errors.New("envFrom: neither configMapRef nor secretRef")
		}
	}
	for _, e := range c.Env {
		switch vf := e.ValueFrom; {
		case vf == nil:
			env[e.Name] = e.Value
			delete(fromSecret, e.Name)
		case vf.ConfigMapKeyRef != nil:
			cm := m.configMap(vf.ConfigMapKeyRef.Name)
			if cm == nil {
				return nil, nil, fmt.Errorf("env %s: no ConfigMap %q in the manifests", e.Name, vf.ConfigMapKeyRef.Name)
			}
			env[e.Name] = cm.Data[vf.ConfigMapKeyRef.Key]
			delete(fromSecret, e.Name)
		case vf.SecretKeyRef != nil:
			s := m.secret(vf.SecretKeyRef.Name)
			if s == nil {
				return nil, nil, fmt.Errorf("env %s: no Secret %q in the manifests", e.Name, vf.SecretKeyRef.Name)
			}
			env[e.Name] = secretData(s)[vf.SecretKeyRef.Key]
			fromSecret[e.Name] = true
		default:
			return nil, nil, fmt.Errorf("env %s: a valueFrom these tests cannot resolve", e.Name)
		}
	}
	return env, fromSecret, nil
}

// containerEnvNames is the name of every variable the container gets.
func (m *manifests) containerEnvNames(c *corev1.Container) ([]string, error) {
	env, _, err := m.containerEnv(c)
	if err != nil {
		return nil, err
	}
	var names []string
	for k := range env {
		names = append(names, k)
	}
	return names, nil
}

// kubernetesConfig is the VPN server's configuration as the manifests give
// it to the one container of the one workload.
type kubernetesConfig struct {
	m          *manifests
	workload   workload
	container  *corev1.Container
	env        map[string]string
	fromSecret map[string]bool
	cpus       int64 // the CPU request in whole CPUs, as the downward API writes it
	cfg        *vpn.Config
	ports      serverPorts
}

// loadKubernetesConfig loads the container's environment with vpn.Loader,
// the Secret's placeholder certificates and key replaced by the test PKI's.
func loadKubernetesConfig(t *testing.T) *kubernetesConfig {
	t.Helper()
	m := loadManifests(t)
	if len(m.workloads) != 1 {
		t.Fatalf("%s: %d Deployments and StatefulSets, want 1", manifestsDir, len(m.workloads))
	}
	w := m.workloads[0]
	if n := len(w.template.Spec.Containers); n != 1 {
		t.Fatalf("%s: %d containers, want 1 (open-balena-vpn)", w.source, n)
	}
	k := &kubernetesConfig{m: m, workload: w, container: &w.template.Spec.Containers[0]}
	var err error
	k.env, k.fromSecret, err = m.containerEnv(k.container)
	if err != nil {
		t.Fatalf("%s: container %s: %v", w.source, k.container.Name, err)
	}
	for name, value := range certVariables(pki(t)) {
		if _, ok := k.env[name]; ok && k.fromSecret[name] {
			k.env[name] = value
		}
	}
	// No Diffie-Hellman parameters are made for the test: "dh none".
	if k.fromSecret["VPN_OPENVPN_SERVER_DH"] {
		delete(k.env, "VPN_OPENVPN_SERVER_DH")
	}
	cpu := k.container.Resources.Requests.Cpu()
	if cpu.IsZero() {
		t.Fatalf("%s: container %s requests no CPU: the downward API's cpu_request, and so the instance count, follows the request", w.source, k.container.Name)
	}
	k.cpus = (cpu.MilliValue() + 999) / 1000 // divisor 1: whole CPUs, rounded up
	k.cfg, err = loadConfig(t, k.env, k.cpus)
	if err != nil {
		t.Fatalf("%s: the container's environment does not load: %v", w.source, err)
	}
	k.ports = portsOf(t, k.cfg)
	return k
}

// TestManifestsDecodeStrictly checks that every document under kubernetes/
// decodes strictly into its Kubernetes API type, and that the manifests
// hold the objects the deployment is made of, each once.
func TestManifestsDecodeStrictly(t *testing.T) {
	m := loadManifests(t)
	if len(m.workloads) != 1 {
		t.Errorf("%d Deployments and StatefulSets, want 1", len(m.workloads))
	}
	if len(m.services) != 2 {
		t.Errorf("%d Services, want 2 (the load balancer and the headless one)", len(m.services))
	}
	if len(m.pdbs) != 1 {
		t.Errorf("%d PodDisruptionBudgets, want 1", len(m.pdbs))
	}
	if len(m.configMaps) != 1 {
		t.Errorf("%d ConfigMaps, want 1", len(m.configMaps))
	}
	if len(m.secrets) != 1 {
		t.Errorf("%d Secrets, want 1 (the template)", len(m.secrets))
	}
	seen := make(map[string]string)
	note := func(source, kind, name string) {
		if prev, ok := seen[kind+"/"+name]; ok {
			t.Errorf("%s: %s %q again (first in %s)", source, kind, name, prev)
		}
		seen[kind+"/"+name] = source
	}
	for _, w := range m.workloads {
		note(w.source, w.kind, w.name)
	}
	for _, s := range m.services {
		note(s.source, "Service", s.obj.Name)
	}
	for _, p := range m.pdbs {
		note(p.source, "PodDisruptionBudget", p.obj.Name)
	}
	for _, c := range m.configMaps {
		note(c.source, "ConfigMap", c.obj.Name)
	}
	for _, s := range m.secrets {
		note(s.source, "Secret", s.obj.Name)
	}
}

// TestStrictDecodingRejectsMistakes checks the checker: the mistakes that
// TestManifestsDecodeStrictly is there to catch do fail decodeDocument.
func TestStrictDecodingRejectsMistakes(t *testing.T) {
	for _, tc := range []struct {
		name, doc string
		ok        bool
	}{
		{"a good ConfigMap", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  VPN_PORT: \"443\"\n", true},
		{"a misspelt field", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replica: 2\n", false},
		{"a field in the wrong place", "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  externalTrafficPolicy: Local\n  ports:\n    - port: 443\n      targetport: openvpn\n", false},
		{"a number for a string", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  VPN_PORT: 443\n", false},
		{"a duplicate key", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  A: \"1\"\n  A: \"2\"\n", false},
		{"an unknown kind", "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: x\n", false},
		{"a wrong apiVersion", "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget\nmetadata:\n  name: x\n", false},
		{"no kind", "apiVersion: v1\nmetadata:\n  name: x\n", false},
	} {
		_, err := decodeDocument([]byte(tc.doc))
		if tc.ok && err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
		if !tc.ok && err == nil {
			t.Errorf("%s: decoded without error", tc.name)
		}
	}
	if n := len(splitDocuments([]byte("# only a comment\n---\na: 1\n--- # two\nb: 2\n---\n\n"))); n != 2 {
		t.Errorf("splitDocuments: %d documents, want 2", n)
	}
}

// TestKubernetesConfigLoads checks that the ConfigMap and the Secret (its
// placeholders for the certificates and key replaced by a throw-away PKI)
// make a configuration that vpn.Loader accepts, and what the deployment
// relies on in it: the instance count from the CPU request, each pod
// registering its own pod IP, and the proxy forwarding to its peers' port.
func TestKubernetesConfigLoads(t *testing.T) {
	k := loadKubernetesConfig(t)
	t.Logf("plan: %d instances of /%d from %v; ports %+v; drain %v", k.cfg.Plan.Instances, k.cfg.Plan.Bits, k.cfg.Plan.Base, k.ports, k.cfg.Drain.Timeout)
	if v := k.env["VPN_INSTANCE_COUNT"]; v != "" && v != "0" {
		t.Errorf("VPN_INSTANCE_COUNT=%q: set, so %s (the CPU request) is never read", v, vpn.DefaultCPURequestFile)
	}
	if got := int64(k.cfg.Plan.Instances); got != k.cpus {
		t.Errorf("%d OpenVPN instances, want %d, the CPU request", got, k.cpus)
	}
	if got := k.cfg.Balena.RegisterInterface; got != "eth0" {
		t.Errorf("VPN_SERVICE_REGISTER_INTERFACE=%q, want eth0: each pod registers its own pod IP", got)
	}
	if k.cfg.HAProxy.Mode != haproxy.Managed {
		t.Errorf("VPN_HAPROXY=%q, want managed: the probes ask HAProxy's monitor", k.cfg.HAProxy.Mode)
	}
	if k.ports.Proxy == 0 {
		t.Error("VPN_CONNECT_PROXY_PORT: no proxy, yet the headless Service is for the proxies")
	}
	// The peers are pods of the same workload, whose proxies listen on
	// VPN_CONNECT_PROXY_PORT: any other forward port would reach nothing.
	if k.ports.Forward != k.ports.Proxy {
		t.Errorf("VPN_FORWARD_PROXY_PORT %d, want VPN_CONNECT_PROXY_PORT %d: the peers are this workload's pods", k.ports.Forward, k.ports.Proxy)
	}
}

// TestKubernetesPortsMatchConfig checks the container ports, the probes,
// the Services and the scrape annotation against the ports the
// configuration gives.
func TestKubernetesPortsMatchConfig(t *testing.T) {
	k := loadKubernetesConfig(t)
	c := k.container
	want := map[string]int{"VPN_PORT": k.ports.VPN, "VPN_CONNECT_PROXY_PORT": k.ports.Proxy, "VPN_HAPROXY_MONITOR_ADDR": k.ports.Monitor, "VPN_METRICS_ADDR": k.ports.Metrics}
	have := make(map[int]bool)
	for _, p := range c.Ports {
		have[int(p.ContainerPort)] = true
	}
	for name, port := range want {
		if port != 0 && !have[port] {
			t.Errorf("container %s: no container port %d (%s)", c.Name, port, name)
		}
	}

	probe := func(what string, p *corev1.Probe, port int) {
		t.Helper()
		switch {
		case p == nil:
			t.Errorf("container %s: no %s", c.Name, what)
		case p.HTTPGet == nil:
			t.Errorf("container %s: %s is not an httpGet", c.Name, what)
		default:
			got, err := resolvePort(c, p.HTTPGet.Port)
			if err != nil {
				t.Errorf("container %s: %s: %v", c.Name, what, err)
			} else if got != port {
				t.Errorf("container %s: %s on port %d, want %d", c.Name, what, got, port)
			}
			if p.HTTPGet.Path != "/ping" {
				t.Errorf("container %s: %s asks %q, want /ping", c.Name, what, p.HTTPGet.Path)
			}
		}
	}
	probe("readinessProbe (HAProxy's monitor)", c.ReadinessProbe, k.ports.Monitor)
	probe("livenessProbe (the metrics server)", c.LivenessProbe, k.ports.Metrics)

	proto := corev1.ProtocolTCP
	if strings.HasPrefix(k.cfg.OpenVPN.Proto, "udp") {
		proto = corev1.ProtocolUDP
	}
	lb := k.service(t, corev1.ServiceTypeLoadBalancer)
	if !k.servesPort(t, lb, k.ports.VPN, proto, false) {
		t.Errorf("%s: Service %s: no port to container port %d/%s (VPN_PORT)", k.workload.source, lb.Name, k.ports.VPN, proto)
	}
	headless := k.headless(t)
	for name, port := range map[string]int{"VPN_CONNECT_PROXY_PORT": k.ports.Proxy, "VPN_FORWARD_PROXY_PORT": k.ports.Forward} {
		// The peers dial the pod IP, so the Service's port must be the
		// container's port itself.
		if !k.servesPort(t, headless, port, corev1.ProtocolTCP, true) {
			t.Errorf("Service %s: no port %d to container port %d (%s)", headless.Name, port, port, name)
		}
	}

	ann := k.workload.template.Annotations
	if p, ok := ann["prometheus.io/port"]; ok && p != strconv.Itoa(k.ports.Metrics) {
		t.Errorf("%s: prometheus.io/port %q, want %d (VPN_METRICS_ADDR)", k.workload.source, p, k.ports.Metrics)
	}
	if p, ok := ann["prometheus.io/path"]; ok && p != "/metrics" && p != "/cluster_metrics" {
		t.Errorf("%s: prometheus.io/path %q, want /metrics or /cluster_metrics", k.workload.source, p)
	}
}

// resolvePort resolves a probe's or a Service's target port, a number or
// the name of one of the container's ports.
func resolvePort(c *corev1.Container, p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

// servesPort says whether svc has a port of proto to container port
// target; with samePort, the Service's own port must be target too.
func (k *kubernetesConfig) servesPort(t *testing.T, svc *corev1.Service, target int, proto corev1.Protocol, samePort bool) bool {
	t.Helper()
	for _, sp := range svc.Spec.Ports {
		tp := sp.TargetPort
		if tp.Type == intstr.Int && tp.IntVal == 0 {
			tp = intstr.FromInt32(sp.Port) // the default: the Service's port
		}
		got, err := resolvePort(k.container, tp)
		if err != nil {
			t.Errorf("Service %s: port %d: %v", svc.Name, sp.Port, err)
			continue
		}
		p := sp.Protocol
		if p == "" {
			p = corev1.ProtocolTCP
		}
		if got == target && p == proto && (!samePort || int(sp.Port) == target) {
			return true
		}
	}
	return false
}

// service is the one Service of type typ.
func (k *kubernetesConfig) service(t *testing.T, typ corev1.ServiceType) *corev1.Service {
	t.Helper()
	var found []*corev1.Service
	for _, s := range k.m.services {
		if s.obj.Spec.Type == typ {
			found = append(found, s.obj)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d Services of type %s, want 1", len(found), typ)
	}
	return found[0]
}

// headless is the one headless Service.
func (k *kubernetesConfig) headless(t *testing.T) *corev1.Service {
	t.Helper()
	var found []*corev1.Service
	for _, s := range k.m.services {
		if s.obj.Spec.ClusterIP == corev1.ClusterIPNone {
			found = append(found, s.obj)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d headless Services (clusterIP: None), want 1", len(found))
	}
	return found[0]
}

// TestKubernetesPod checks what the pod needs from the node and the
// cluster: NET_ADMIN, /dev/net/tun, the CPU request file from the downward
// API, the run directory; and that the Services, the PodDisruptionBudget
// and the workload select its pods.
func TestKubernetesPod(t *testing.T) {
	k := loadKubernetesConfig(t)
	spec := &k.workload.template.Spec
	c := k.container

	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil || !containsCap(sc.Capabilities.Add, "NET_ADMIN") {
		t.Errorf("container %s: securityContext.capabilities.add lacks NET_ADMIN (tun devices, addresses, routes, tc)", c.Name)
	}
	if sc != nil && sc.Privileged != nil && *sc.Privileged {
		t.Errorf("container %s: privileged; NET_ADMIN and /dev/net/tun are all it needs", c.Name)
	}

	// /dev/net/tun from the node, as a character device.
	tun := volumeMountedAt(spec, c, "/dev/net/tun")
	switch {
	case tun == nil:
		t.Errorf("container %s: nothing mounted at /dev/net/tun", c.Name)
	case tun.HostPath == nil || tun.HostPath.Path != "/dev/net/tun":
		t.Errorf("volume %s: want hostPath /dev/net/tun", tun.Name)
	case tun.HostPath.Type == nil || *tun.HostPath.Type != corev1.HostPathCharDev:
		typ := corev1.HostPathType("none")
		if tun.HostPath.Type != nil {
			typ = *tun.HostPath.Type
		}
		t.Errorf("volume %s: hostPath type %q, want CharDevice", tun.Name, typ)
	}

	// The CPU request at vpn.DefaultCPURequestFile, in whole CPUs.
	dir, file := filepath.Split(vpn.DefaultCPURequestFile)
	podinfo := volumeMountedAt(spec, c, filepath.Clean(dir))
	if podinfo == nil || podinfo.DownwardAPI == nil {
		t.Errorf("container %s: no downwardAPI volume mounted at %s", c.Name, filepath.Clean(dir))
	} else {
		var item *corev1.DownwardAPIVolumeFile
		for i := range podinfo.DownwardAPI.Items {
			if podinfo.DownwardAPI.Items[i].Path == file {
				item = &podinfo.DownwardAPI.Items[i]
			}
		}
		switch {
		case item == nil:
			t.Errorf("volume %s: no item %s (%s)", podinfo.Name, file, vpn.DefaultCPURequestFile)
		case item.ResourceFieldRef == nil:
			t.Errorf("volume %s: %s: no resourceFieldRef", podinfo.Name, file)
		default:
			ref := item.ResourceFieldRef
			if ref.Resource != "requests.cpu" {
				t.Errorf("volume %s: %s: resource %q, want requests.cpu", podinfo.Name, file, ref.Resource)
			}
			if ref.ContainerName != c.Name {
				t.Errorf("volume %s: %s: containerName %q, want %q", podinfo.Name, file, ref.ContainerName, c.Name)
			}
			if ref.Divisor.String() != "1" {
				t.Errorf("volume %s: %s: divisor %s, want 1 (whole CPUs)", podinfo.Name, file, ref.Divisor.String())
			}
		}
	}

	// The run directory: scratch, gone with the pod.
	if run := volumeMountedAt(spec, c, k.cfg.RunDir); run == nil || run.EmptyDir == nil {
		t.Errorf("container %s: no emptyDir mounted at VPN_RUN_DIR %s", c.Name, k.cfg.RunDir)
	}

	podLabels := labels.Set(k.workload.template.Labels)
	selects := func(what string, sel *metav1.LabelSelector) {
		t.Helper()
		s, err := metav1.LabelSelectorAsSelector(sel)
		if err != nil {
			t.Errorf("%s: selector: %v", what, err)
		} else if sel == nil || s.Empty() || !s.Matches(podLabels) {
			t.Errorf("%s: selector %v does not select the pods (labels %v)", what, sel, podLabels)
		}
	}
	selects(k.workload.kind+" "+k.workload.name, k.workload.selector)
	for _, s := range k.m.services {
		if len(s.obj.Spec.Selector) == 0 || !labels.SelectorFromSet(s.obj.Spec.Selector).Matches(podLabels) {
			t.Errorf("%s: Service %s: selector %v does not select the pods (labels %v)", s.source, s.obj.Name, s.obj.Spec.Selector, podLabels)
		}
	}
	for _, p := range k.m.pdbs {
		selects("PodDisruptionBudget "+p.obj.Name, p.obj.Spec.Selector)
		if mu := p.obj.Spec.MaxUnavailable; mu == nil || *mu != intstr.FromInt32(1) {
			t.Errorf("%s: PodDisruptionBudget %s: maxUnavailable %v, want 1", p.source, p.obj.Name, mu)
		}
	}

	lb := k.service(t, corev1.ServiceTypeLoadBalancer)
	if lb.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
		t.Errorf("Service %s: externalTrafficPolicy %q, want Local (the devices' addresses kept, no second hop)", lb.Name, lb.Spec.ExternalTrafficPolicy)
	}
	if h := k.headless(t); h.Spec.Type != "" && h.Spec.Type != corev1.ServiceTypeClusterIP {
		t.Errorf("Service %s: type %s, want ClusterIP with clusterIP None", h.Name, h.Spec.Type)
	}
}

// volumeMountedAt is the pod's volume that c mounts at path, or nil.
func volumeMountedAt(spec *corev1.PodSpec, c *corev1.Container, path string) *corev1.Volume {
	for _, vm := range c.VolumeMounts {
		if filepath.Clean(vm.MountPath) != filepath.Clean(path) || vm.SubPath != "" {
			continue
		}
		for i := range spec.Volumes {
			if spec.Volumes[i].Name == vm.Name {
				return &spec.Volumes[i]
			}
		}
	}
	return nil
}

func containsCap(caps []corev1.Capability, name string) bool {
	for _, c := range caps {
		if strings.TrimPrefix(strings.ToUpper(string(c)), "CAP_") == name {
			return true
		}
	}
	return false
}

// secretVariables are the variables that hold keys: they belong in the
// Secret, never in the ConfigMap.
var secretVariables = []string{
	"VPN_SERVICE_API_KEY", "VPN_GUEST_API_KEY",
	"VPN_OPENVPN_CA_CRT", "VPN_OPENVPN_SERVER_CRT", "VPN_OPENVPN_SERVER_KEY", "VPN_OPENVPN_SERVER_DH",
	"MONITOR_SECRET_TOKEN",
}

// TestSecretTemplate checks that the Secret is a template: every value is
// a clearly fake placeholder, it holds the required keys and the
// certificates, the ConfigMap holds none of them, and it lies in a
// subfolder, which kubectl apply -f kubernetes/ does not read (so applying
// the manifests never overwrites the real Secret with the placeholders).
func TestSecretTemplate(t *testing.T) {
	m := loadManifests(t)
	for _, s := range m.secrets {
		if filepath.Dir(strings.SplitN(s.source, "#", 2)[0]) == filepath.Clean(manifestsDir) {
			t.Errorf("%s: Secret %s is in %s/ itself, so kubectl apply -f %s/ would apply its placeholders", s.source, s.obj.Name, manifestsDir, manifestsDir)
		}
		data := secretData(s.obj)
		for k, v := range data {
			if !bytes.Contains([]byte(v), []byte("FAKE")) {
				t.Errorf("%s: Secret %s: %s is not a placeholder (want FAKE in it)", s.source, s.obj.Name, k)
			}
		}
		for _, k := range []string{"VPN_SERVICE_API_KEY", "VPN_OPENVPN_CA_CRT", "VPN_OPENVPN_SERVER_CRT", "VPN_OPENVPN_SERVER_KEY", "MONITOR_SECRET_TOKEN"} {
			if _, ok := data[k]; !ok {
				t.Errorf("%s: Secret %s: no %s", s.source, s.obj.Name, k)
			}
		}
	}
	for _, c := range m.configMaps {
		for _, k := range secretVariables {
			if _, ok := c.obj.Data[k]; ok {
				t.Errorf("%s: ConfigMap %s holds %s: it belongs in the Secret", c.source, c.obj.Name, k)
			}
		}
	}
}
