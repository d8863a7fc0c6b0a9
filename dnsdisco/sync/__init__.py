"""Mirror mode: following a real Consul catalog with blocking queries (the second producer of
the DNS snapshot, beside the embedded catalog).

* :mod:`~dnsdisco.sync.upstream` - the ``upstream`` config section and ``CONSUL_*`` env vars;
* :mod:`~dnsdisco.sync.consul` - Consul's blocking-query protocol, client side (index rules,
  token bucket, backoff, the one HTTP session);
* :mod:`~dnsdisco.sync.parse` - Consul's JSON into :mod:`dnsdisco.catalog.model` values;
* :mod:`~dnsdisco.sync.mirror` - ``Mirror``, which runs the watches and produces the same
  ``CatalogDelta`` values the embedded catalog would.

Nothing is imported here, so that reading the configuration does not load the HTTP client.
"""
