"""The A2A gateway: A2A v1.0 clients reach agent2389 agents over the broker (docs/gateway.md)."""
