"""raygate's control plane, layered bottom-up: spec, plan/health/serve client/providers,
store, controller, then the admin API and CLI on top. Imports point down only."""
