//! gRPC adapter (containerd snapshots v1), config, daemon wiring and signals.
