"""Write the seed corpora of the fuzz harnesses (``corpus/packet``, ``corpus/definition``).

Seeds are real requests of every form the spec answers (service, tag, RFC 2782, node, addr,
PTR, SOA, NS, other datacenters, names that do not exist or are not ours) in each EDNS variant
(none, sizes, version 1, DO, ECS, unknown options and flags) plus malformed ones (bad counts,
broken labels, two OPTs, OPT outside Additional, truncated options), and JSON bodies of the
HTTP API. Deterministic: running it again rewrites the same files. Run from the repository
root: ``python3 tests/fuzz/make_corpus.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from tests.dnstest import ecs_option, opt_rr, question, request  # noqa: E402

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, ANY = 1, 2, 5, 6, 12, 15, 16, 28, 33, 255

QUERIES: list[tuple[str, str, int]] = [
    ("service-a", "web.service.consul.", A),
    ("service-srv", "web.service.consul.", SRV),
    ("service-aaaa", "api.service.consul.", AAAA),
    ("service-any", "web.service.consul.", ANY),
    ("service-txt", "web.service.consul.", TXT),
    ("service-case", "WEB.Service.CONSUL.", SRV),
    ("service-hostname", "ext.service.consul.", A),
    ("service-cname-loop", "loop.service.consul.", A),
    ("service-alias", "alias.service.consul.", SRV),
    ("service-dc", "web.service.dc1.consul.", A),
    ("service-dc-dc", "web.service.dc2.dc.consul.", SRV),
    ("service-unknown-dc", "web.service.dc9.consul.", A),
    ("service-critical", "down.service.consul.", A),
    ("service-big", "consul.service.consul.", SRV),
    ("service-nx", "nosuch.service.consul.", A),
    ("tag", "primary.web.service.consul.", A),
    ("tag-srv", "v1.web.service.consul.", SRV),
    ("rfc2782", "_web._primary.service.consul.", SRV),
    ("rfc2782-tcp", "_web._tcp.service.consul.", SRV),
    ("rfc2782-dc", "_db._replica.dc1.consul.", SRV),
    ("node", "node1.node.consul.", A),
    ("node-any", "node1.node.dc1.consul.", ANY),
    ("node-txt", "node1.node.consul.", TXT),
    ("node-hostname", "nodeh.node.consul.", A),
    ("node-v6", "dual.node.consul.", AAAA),
    ("addr-v4", "0a000001.addr.consul.", A),
    ("addr-v6", "20010db8000000000000000000000006.addr.consul.", AAAA),
    ("addr-bad", "zz.addr.consul.", A),
    ("ptr-v4", "1.0.0.10.in-addr.arpa.", PTR),
    ("ptr-v6", "6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.", PTR),
    ("ptr-unknown", "9.9.9.9.in-addr.arpa.", PTR),
    ("soa", "consul.", SOA),
    ("ns", "consul.", NS),
    ("apex-a", "consul.", A),
    ("query", "x.query.consul.", A),
    ("alt-domain", "web.service.disco.", A),
    ("outside", "example.com.", A),
    ("root", ".", NS),
]

EDNS: list[tuple[str, list[bytes]]] = [
    ("noedns", []),
    ("edns512", [opt_rr(512)]),
    ("edns1232", [opt_rr(1232)]),
    ("edns4096-do", [opt_rr(4096, do=True)]),
    ("edns-small", [opt_rr(100)]),
    ("edns-v1", [opt_rr(1232, version=1)]),
    ("ecs-v4", [opt_rr(1232, options=[ecs_option(1, 24, b"\x0a\x01\x02")])]),
    ("ecs-v6", [opt_rr(1232, options=[ecs_option(2, 56, b"\x20\x01\x0d\xb8\x00\x00\x01")])]),
    ("ecs-zero", [opt_rr(1232, options=[ecs_option(0, 0, b"")])]),
    ("unknown-option", [opt_rr(1232, options=[(100, b""), (10, b"\x01\x02\x03\x04\x05\x06\x07\x08")])]),
    ("unknown-flag", [b"\x00" + struct.pack("!HHIH", 41, 1232, 0x0080, 0)]),
]


def malformed() -> dict[str, bytes]:
    q = question("web.service.consul.")
    good_opt = opt_rr(1232, options=[(100, b"abcdefgh")])
    return {
        "short-header": request()[:11],
        "response": request(flags=0x8100),
        "notify": request(flags=0x2000, additional=[opt_rr(1232)]),
        "qdcount-0": request(body=b"", counts=(0, 0, 0, 1), additional=[opt_rr(1232)]),
        "qdcount-2": request(body=q + q, counts=(2, 0, 0, 0)),
        "huge-counts": request(counts=(1, 300, 300, 300)),
        "label-overrun": request(body=b"\x03web\x07serv"),
        "pointer-in-question": request(body=b"\xc0\x0c\x00\x01\x00\x01"),
        "ext-label": request(body=b"\x41abc\x00\x00\x01\x00\x01"),
        "long-name": request(body=(b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01"),
        "escaped-name": request(body=b"\x03a.b\x02\x00Z\x06consul\x00\x00\x01\x00\x01"),
        "two-opts": request(additional=[opt_rr(1232), opt_rr(4096)]),
        "opt-not-root": request(additional=[b"\x01a\x00" + opt_rr(1232)[1:]]),
        "opt-in-answer": request(counts=(1, 1, 0, 0)) + opt_rr(1232),
        "opt-truncated": request(counts=(1, 0, 0, 1)) + b"\x00\x00\x29",
        "option-overrun": request(additional=[good_opt[:-10] + struct.pack("!HH", 100, 50) + b"abcdefgh"]),
        "ecs-two": request(additional=[opt_rr(1232, options=[ecs_option(1, 24, b"\x0a\x01\x02")] * 2)]),
        "ecs-bad-prefix": request(additional=[opt_rr(1232, options=[ecs_option(1, 33, b"\x0a\x00\x00\x00\x00")])]),
        "answer-rr-pointer": request(counts=(1, 1, 0, 1), additional=[
            b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x0a\x00\x00\x01", opt_rr(2048)]),
        "forward-pointer": request(counts=(1, 1, 0, 0), additional=[b"\xc0\xff" + struct.pack("!HHIH", 1, 1, 0, 0)]),
        "class-chaos": request("version.bind.", TXT, qclass=3),
        "class-any": request(qclass=255),
        "trailing-junk": request() + b"\x00\x01junk",
    }


def packet_seeds() -> dict[str, bytes]:
    """name -> seed; the first byte is the harness's mode (bit 0: TCP; above: which table)."""
    seeds: dict[str, bytes] = {}
    for i, (qname, name, qtype) in enumerate(QUERIES):
        # Every query with and without EDNS over UDP on the default table; the other EDNS
        # variants, transports and tables in rotation, so the corpus stays ~200 small files
        # while every variant meets many query forms.
        variants = {0, 2, i % len(EDNS), (i + 5) % len(EDNS)}
        for j in sorted(variants):
            ename, extra = EDNS[j]
            data = request(name, qtype, id=0x1000 + i, flags=0x0100, additional=extra)
            seeds[f"{qname}-{ename}-udp"] = b"\x00" + data
            if (i + j) % 3 == 0:
                seeds[f"{qname}-{ename}-tcp"] = b"\x01" + data
            if (i + j) % 4 == 1:
                table = 1 + (i + j) % 2
                seeds[f"{qname}-{ename}-table{table}"] = bytes([2 * table]) + data
    for name, data in malformed().items():
        seeds[f"malformed-{name}"] = b"\x00" + data
    return seeds


def definition_seeds() -> dict[str, bytes]:
    """name -> seed for fuzz_definition: the first byte picks the decoder, the rest is JSON."""
    bodies = {
        # 0: agent service register
        "service-minimal": (0, {"Name": "web"}),
        "service-full": (0, {
            "Name": "web", "ID": "web-1", "Address": "10.0.0.3", "Port": 8080, "Tags": ["v1", "primary"],
            "Meta": {"version": "1"}, "Weights": {"Passing": 10, "Warning": 1},
            "TaggedAddresses": {"lan": {"Address": "10.0.0.3", "Port": 8080}},
            "Check": {"HTTP": "http://10.0.0.3:8080/health", "Interval": "10s", "Timeout": "2s"},
        }),
        "service-checks": (0, {"name": "db", "port": 5432, "checks": [
            {"TTL": "30s"}, {"tcp": "10.0.0.1:5432", "interval": "5s", "deregister_critical_service_after": "90m"},
            {"args": ["/bin/true"], "interval": "10s"}, {"GRPC": "10.0.0.1:9000", "Interval": 10000000000}]}),
        "service-bad-types": (0, {"Name": 5, "Port": "80", "Tags": "x", "Meta": [], "Check": {"TTL": 3.5}}),
        "service-unknown-key": (0, {"Name": "web", "Nope": True}),
        # 1: agent check register
        "check-ttl": (1, {"Name": "mem", "TTL": "15s", "Status": "passing", "ServiceID": "web-1"}),
        "check-http": (1, {"Name": "h", "HTTP": "https://x/", "Method": "POST", "Header": {"A": ["b"]},
                           "TLSSkipVerify": True, "Interval": "10s"}),
        "check-bad": (1, {"Name": "", "Interval": "ten seconds"}),
        # 2: check update
        "update": (2, {"Status": "passing", "Output": "ok"}),
        "update-bad": (2, {"Status": "fine"}),
        # 3: catalog register
        "register": (3, {"Node": "n1", "Address": "10.0.0.9", "Datacenter": "dc1", "NodeMeta": {"a": "b"},
                         "Service": {"Service": "web", "ID": "web-9", "Port": 80, "Tags": ["x"]},
                         "Checks": [{"CheckID": "c1", "Name": "c", "Status": "passing", "ServiceID": "web-9",
                                     "Definition": {"HTTP": "http://x", "Interval": "10s"}}]}),
        "register-skip": (3, {"Node": "n1", "SkipNodeUpdate": True, "Check": {"Name": "x", "Node": "N1"}}),
        "register-bad-id": (3, {"Node": "n1", "ID": "not-a-uuid", "Address": "x"}),
        # 4: catalog deregister
        "deregister": (4, {"Node": "n1", "ServiceID": "web-9"}),
        "deregister-check": (4, {"Node": "n1", "CheckID": "c1", "Datacenter": "dc1"}),
    }
    seeds = {name: bytes([which]) + json.dumps(body).encode() for name, (which, body) in bodies.items()}
    seeds["not-json"] = b"\x00{\"Name\": "
    seeds["array"] = b"\x03[1, 2, {}]"
    seeds["null"] = b"\x01null"
    return seeds


def definition_dict() -> str:
    """libFuzzer dictionary for fuzz_definition: the JSON keys the decoders know, and values
    of the shapes they read (durations, statuses, addresses)."""
    from dnsdisco.catalog import definition

    keys: set[str] = set()
    for name in dir(definition):
        schema = getattr(definition, name)
        if isinstance(schema, definition._Schema):
            for f in schema.fields:
                keys.add(f.name)
                keys.add(f.snake or definition._snake(f.name))
                keys.update(f.aliases)
    tokens = sorted(f'"{k}"' for k in keys)
    tokens += ['"10s"', '"1h30m"', '"-5ms"', '"passing"', '"warning"', '"critical"', '"maintenance"',
               '"10.0.0.1"', '"::"', '"0.0.0.0"', '"::1"', "null", "true", "false", "1e400", "-1",
               "18446744073709551616", "{}", "[]", '":"', '","']
    lines = [f'kw{i}="{t.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for i, t in enumerate(tokens)]
    return "\n".join(lines) + "\n"


def write(directory: str, seeds: dict[str, bytes]) -> None:
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    for name, data in seeds.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def main() -> None:
    write(os.path.join(HERE, "corpus", "packet"), packet_seeds())
    write(os.path.join(HERE, "corpus", "definition"), definition_seeds())
    with open(os.path.join(HERE, "definition.dict"), "w") as f:
        f.write(definition_dict())


if __name__ == "__main__":
    main()
