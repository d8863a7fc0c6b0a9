"""dnsdisco: DNS-based service discovery with a Consul-compatible catalog."""

__version__ = "0.1.0"
