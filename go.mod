module github.com/obvpn/obvpn

go 1.26.0

require (
	github.com/caarlos0/env/v10 v10.0.0 // indirect
	github.com/hashicorp/go-cleanhttp v0.5.2 // indirect
	github.com/hashicorp/go-retryablehttp v0.7.8 // indirect
	github.com/lmittmann/tint v1.2.1 // indirect
	github.com/matryer/is v1.4.1 // indirect
	github.com/prometheus/client_golang v1.25.0 // indirect
	golang.org/x/net v0.62.0 // indirect
)
