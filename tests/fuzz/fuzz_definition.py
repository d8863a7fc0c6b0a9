"""Coverage-guided fuzzing (atheris) of the HTTP API's request decoding: a body, parsed as the
API parses it (``dnsdisco.http.query.decode_json``), then one of the decoders of
``dnsdisco.catalog.definition``.

The first input byte picks the decoder (agent service register, agent check register, check
update, catalog register, catalog deregister); the rest is the body. Each call must return a
value or raise :class:`~dnsdisco.errors.CatalogError` (a ``DecodeError``: 400 with Consul's
text, or one of Consul's RPC refusals); any other exception is a crash (it would be a 500
``internal error`` from the API). The seeds are in ``corpus/definition``; key names and tokens
in ``definition.dict``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["dnsdisco"]):
    from dnsdisco.catalog import definition
    from dnsdisco.errors import CatalogError, DecodeError
    from dnsdisco.http.query import decode_json

DECODERS = (
    lambda body: definition.decode_service_definition(body, node="n1", enable_script_checks=False),
    lambda body: definition.decode_check_definition(body, node="n1", enable_script_checks=True),
    definition.decode_check_update,
    lambda body: definition.decode_register_request(body, datacenter="dc1"),
    lambda body: definition.decode_deregister_request(body, datacenter="dc1"),
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    which = data[0] % len(DECODERS)
    try:
        body = decode_json(data[1:])
    except DecodeError as e:
        assert e.status == 400 and e.message.startswith("Request decode failed: "), e.message
        return
    try:
        DECODERS[which](body)
    except CatalogError as e:
        assert e.status in (400, 500) and e.message, (e.status, e.message)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
