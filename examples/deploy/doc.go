// Package deploy holds no code: it is the test module of the deployment
// files beside it (the Dockerfile, compose.yaml, the Kubernetes manifests
// in kubernetes/, grafana-dashboard.json and the systemd unit in
// systemd/). Its tests check those files against the code they deploy,
// offline: that every manifest decodes strictly into the Kubernetes API
// types, that every environment variable they set is one that package vpn
// reads, that the configuration they give loads with vpn.Loader and agrees
// with their ports, probes and grace periods, that the dashboard only
// queries metrics the server registers, that the image builds and installs
// what the deployments run, and that the systemd unit has the settings
// that upgrades in place need.
//
// It is a module of its own (github.com/obvpn/obvpn/examples/deploy, with
// a replace directive to the repository root) so that the main module does
// not depend on k8s.io/api. Run its tests with
//
//	cd examples/deploy && go test ./...
package deploy
