package vpn

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/matryer/is"
)

func TestLoadSentry(t *testing.T) {
	const dsn = "https://SECRETpublickey@sentry.example.com/42"
	tests := []struct {
		name    string
		env     []string
		want    SentryConfig
		wantErr string
		warns   bool
	}{
		{name: "unset", want: SentryConfig{Environment: "development"}},
		{name: "SENTRY_DSN", env: []string{"SENTRY_DSN", dsn}, want: SentryConfig{DSN: dsn, Environment: "development"}},
		{name: "VPN_SENTRY_DSN", env: []string{"VPN_SENTRY_DSN", dsn}, want: SentryConfig{DSN: dsn, Environment: "development"}},
		{name: "both agree", env: []string{"SENTRY_DSN", dsn, "VPN_SENTRY_DSN", dsn}, want: SentryConfig{DSN: dsn, Environment: "development"}},
		{name: "both disagree: the reference's name wins", env: []string{"SENTRY_DSN", dsn, "VPN_SENTRY_DSN", "http://SECRETother@127.0.0.1/1"},
			want: SentryConfig{DSN: dsn, Environment: "development"}, warns: true},
		{name: "production", env: []string{"PRODUCTION_MODE", "true", "SENTRY_DSN", dsn}, want: SentryConfig{DSN: dsn, Environment: "production"}},
		{name: "production false", env: []string{"PRODUCTION_MODE", "false"}, want: SentryConfig{Environment: "development"}},
		{name: "not http", env: []string{"SENTRY_DSN", "ftp://SECRETkey@host/1"}, wantErr: "SENTRY_DSN: want an http or https URL"},
		{name: "no key", env: []string{"VPN_SENTRY_DSN", "https://sentry.example.com/1"}, wantErr: "VPN_SENTRY_DSN: want https://<key>@<host>/<project id>"},
		{name: "no project", env: []string{"SENTRY_DSN", "https://SECRETkey@sentry.example.com/"}, wantErr: "SENTRY_DSN: names no project: want https://<key>@<host>/<project id>"},
		{name: "a trailing slash", env: []string{"SENTRY_DSN", "https://SECRETkey@sentry.example.com/42/"}, wantErr: "SENTRY_DSN: names no project: want https://<key>@<host>/<project id>"},
		{name: "a path before the project", env: []string{"SENTRY_DSN", "https://SECRETkey@sentry.example.com/sentry/42"},
			want: SentryConfig{DSN: "https://SECRETkey@sentry.example.com/sentry/42", Environment: "development"}},
		{name: "not a URL", env: []string{"SENTRY_DSN", "https://SECRETkey@[::1/1"}, wantErr: "SENTRY_DSN: not a URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			is := is.New(t)
			var logs bytes.Buffer
			l := loader(serverEnv(tt.env...))
			l.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			c, err := l.Config()
			env := serverEnv(tt.env...)
			env["VPN_CONNECT_PROXY_PORT"] = "3128"
			pl := loader(env)
			pc, perr := pl.ConnectProxyConfig()
			if tt.wantErr != "" {
				is.True(err != nil)
				is.Equal(err.Error(), tt.wantErr)
				is.True(perr != nil)
				is.Equal(perr.Error(), tt.wantErr)
				return
			}
			is.NoErr(err)
			is.NoErr(perr)
			is.Equal(c.Sentry, tt.want)
			is.Equal(pc.Sentry, tt.want)
			is.Equal(strings.Contains(logs.String(), "SENTRY_DSN"), tt.warns)
			is.True(!strings.Contains(logs.String(), "SECRET")) // the DSN's key is never logged
			var out bytes.Buffer
			slog.New(slog.NewTextHandler(&out, nil)).Info("config", "config", c)
			is.True(!strings.Contains(out.String(), "SECRET"))
		})
	}
}
