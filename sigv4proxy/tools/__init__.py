"""Command-line tools: the CLI, `call`, the demo, the Go sidecar's flags, the iptables rules."""
