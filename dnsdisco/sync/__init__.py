"""Mirror mode: following a real Consul catalog with blocking queries (the second producer of
the DNS snapshot, beside the embedded catalog)."""
