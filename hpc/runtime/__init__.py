"""Shared by workers, the frontend and the CLI: discovery (etcd), messaging (NATS), the wire protocol, KV transfer.
Imports none of the components above it."""
