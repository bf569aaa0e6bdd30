"""Cluster providers: where a service's Ray clusters come from (local processes, KubeRay)."""
