"""Configuration loading: defaults, merge order, flags, and errors that name the file and key."""

from __future__ import annotations

import glob
import json
import os

import pytest

from dnsdisco import cli
from dnsdisco import config as configmod
from dnsdisco.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_defaults_match_consul():
    cfg = configmod.load(dev=True, hostname=lambda: "host-a")
    assert cfg.datacenter == "dc1"
    assert cfg.node_name == "host-a"
    assert (cfg.http_bind, cfg.http_port) == ("127.0.0.1", 8500)
    assert (cfg.dns_bind, cfg.dns_port) == ("127.0.0.1", 8600)
    assert cfg.domain == "consul."
    assert cfg.recursors == ()
    d = cfg.dns_config
    assert (d.allow_stale, d.node_ttl, d.only_passing, d.enable_truncate) == (True, 0.0, False, False)
    assert (d.udp_answer_limit, d.a_record_limit, d.recursor_strategy, d.recursor_timeout) == (3, 0, "sequential", 2.0)
    assert d.enable_additional_node_meta_txt is True
    assert (d.soa.refresh, d.soa.retry, d.soa.expire, d.soa.min_ttl) == (3600, 600, 86400, 0)


def test_later_files_override_earlier_and_flags_override_files(tmp_path):
    a = write(tmp_path, "a.json", {"datacenter": "east", "ports": {"dns": 8601, "http": 8501},
                                   "dns_config": {"node_ttl": "10s", "soa": {"min_ttl": 5}}})
    b = write(tmp_path, "b.json", {"ports": {"dns": 8602}, "dns_config": {"only_passing": True}})
    cfg = configmod.load([a, b], overrides={"ports": {"http": 9000}}, dev=True)
    assert cfg.datacenter == "east"
    assert (cfg.dns_port, cfg.http_port) == (8602, 9000)
    assert cfg.dns_config.node_ttl == 10.0 and cfg.dns_config.only_passing is True
    assert cfg.dns_config.soa.min_ttl == 5 and cfg.dns_config.soa.refresh == 3600


def test_config_dir_reads_json_in_lexical_order_and_appends_services(tmp_path):
    write(tmp_path, "20-b.json", {"node_name": "second", "service": {"name": "b"}})
    write(tmp_path, "10-a.json", {"node_name": "first", "services": [{"name": "a"}]})
    write(tmp_path, "notes.txt", "ignored: not json")
    cfg = configmod.load(dirs=[str(tmp_path)], dev=True)
    assert cfg.node_name == "second"
    assert [s.definition["name"] for s in cfg.services] == ["a", "b"]
    assert cfg.services[0].source.endswith("10-a.json")


@pytest.mark.parametrize(
    "content, key, fragment",
    [
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"dns_config": {"nope": True}}, "dns_config.nope", "unknown key"),
        ({"dns_config": {"node_ttl": "10"}}, "dns_config.node_ttl", "invalid duration"),
        ({"dns_config": {"node_ttl": 10}}, "dns_config.node_ttl", "duration string"),
        ({"dns_config": {"udp_answer_limit": 0}}, "dns_config.udp_answer_limit", "between 1"),
        ({"dns_config": {"recursor_strategy": "fastest"}}, "dns_config.recursor_strategy", "sequential"),
        ({"dns_config": {"soa": {"min_ttl": -1}}}, "dns_config.soa.min_ttl", "between 0"),
        ({"dns_config": {"service_ttl": {"web": "x"}}}, "dns_config.service_ttl", "'web'"),
        ({"ports": {"dns": 70000}}, "ports.dns", "between -1 and 65535"),
        ({"ports": {"dns": "8600"}}, "ports.dns", "expected an integer"),
        ({"client_addr": "localhost"}, "client_addr", "IP address"),
        ({"recursors": ["8.8.8.8:99999"]}, "recursors", "invalid port"),
        ({"recursors": ["dns.example"]}, "recursors", "not an IP address"),
        ({"enable_script_checks": "yes"}, "enable_script_checks", "true or false"),
        ({"domain": "bad..name"}, "domain", "not a valid domain"),
        ({"services": {"name": "x"}}, "services", "list of services"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, content, key, fragment):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(ConfigError) as exc:
        configmod.load([path], dev=True)
    text = str(exc.value)
    assert path in text and f"'{key}'" in text and fragment in text, text
    assert exc.value.key == key and exc.value.source == path


def test_invalid_json_names_the_file_and_position(tmp_path):
    path = write(tmp_path, "broken.json", '{"datacenter": "dc1",\n  "ports": }')
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 2"):
        configmod.load([path], dev=True)


def test_hcl_files_are_refused_not_silently_skipped(tmp_path):
    write(tmp_path, "web.hcl", 'service { name = "web" }')
    with pytest.raises(ConfigError, match="HCL"):
        configmod.load(dirs=[str(tmp_path)], dev=True)


def test_data_dir_required_unless_dev():
    with pytest.raises(ConfigError, match="data_dir"):
        configmod.load()
    assert configmod.load(overrides={"data_dir": "/tmp/x"}).data_dir == "/tmp/x"
    assert configmod.load(overrides={"data_dir": "/tmp/x"}, dev=True).data_dir == ""


def test_domains_and_recursors_are_normalised(tmp_path):
    cfg = configmod.load(overrides={"domain": "Example.", "alt_domain": "ALT.test",
                                    "recursors": ["10.0.0.1", "10.0.0.1", "[::1]:5353", "10.0.0.2:5300"]},
                         dev=True)
    assert cfg.domain == "example." and cfg.alt_domain == "alt.test."
    assert cfg.recursors == ("10.0.0.1:53", "[::1]:5353", "10.0.0.2:5300")
    with pytest.raises(ConfigError, match="alt_domain"):
        configmod.load(overrides={"domain": "a", "alt_domain": "a."}, dev=True)


def test_service_ttl_prefers_exact_then_longest_prefix_then_star():
    cfg = configmod.load(overrides={"dns_config": {"service_ttl": {"d*": "42s", "db": "10s", "db*": "66s", "*": "5s"}}},
                         dev=True)
    ttl = cfg.dns_config.service_ttl_for
    assert (ttl("db"), ttl("dblb"), ttl("dk"), ttl("api"), ttl("DB")) == (10, 66, 42, 5, 10)
    assert configmod.load(dev=True).dns_config.service_ttl_for("api") == 0


@pytest.mark.parametrize("dash", ["-", "--"])
def test_agent_flags_in_consul_and_gnu_spelling(dash, tmp_path):
    cfgfile = write(tmp_path, "a.json", {"datacenter": "fromfile", "recursors": ["10.0.0.9"]})
    args = cli.build_parser().parse_args([
        "agent", f"{dash}dev", f"{dash}config-file", cfgfile, f"{dash}node", "n1", f"{dash}datacenter", "dc7",
        f"{dash}client", "127.0.0.2", f"{dash}bind", "127.0.0.3", f"{dash}advertise", "127.0.0.4",
        f"{dash}http-port", "-1", f"{dash}dns-port=8653", f"{dash}domain", "disco", f"{dash}alt-domain", "alt",
        f"{dash}recursor", "10.0.0.1", f"{dash}recursor", "10.0.0.2:5353", f"{dash}enable-script-checks",
    ])
    cfg = cli._load(args)
    assert (cfg.node_name, cfg.datacenter, cfg.client_addr, cfg.bind_addr, cfg.advertise) == (
        "n1", "dc7", "127.0.0.2", "127.0.0.3", "127.0.0.4")
    assert (cfg.http_port, cfg.dns_port, cfg.domain, cfg.alt_domain) == (-1, 8653, "disco.", "alt.")
    assert cfg.recursors == ("10.0.0.9:53", "10.0.0.1:53", "10.0.0.2:5353")
    assert cfg.enable_script_checks is True and cfg.dev is True


def test_cli_exit_codes(tmp_path, capsys):
    bad = write(tmp_path, "bad.json", {"ports": {"dns": "x"}})
    assert cli.main(["agent", "-dev", "-config-file", bad]) == 1
    assert "bad.json: key 'ports.dns'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["agent", "-no-such-flag"])
    assert exc.value.code == 2
    assert cli.main(["version"]) == 0


def test_every_example_config_loads_and_validates():
    # CoreDNS keeps a test that every README/example config parses; so do we.
    paths = sorted(glob.glob(os.path.join(ROOT, "config", "*.json")))
    assert paths, "config/ has example files"
    for path in paths:
        configmod.load([path])
    services_dir = os.path.join(ROOT, "config", "services")
    cfg = configmod.load(dirs=[services_dir], dev=True)
    decoded = configmod.decode_services(cfg)
    assert {s.name for s, _ in decoded} >= {"web", "api", "db"}
    assert cli.main(["validate", services_dir]) == 0


def test_bad_service_definition_names_file_and_key(tmp_path):
    path = write(tmp_path, "svc.json", {"service": {"name": "web", "check": {"tcp": "127.0.0.1:1", "interval": "soon"}}})
    cfg = configmod.load([path], dev=True)
    with pytest.raises(ConfigError) as exc:
        configmod.decode_services(cfg)
    assert path in str(exc.value) and "interval" in str(exc.value)


def test_default_dns_workers_honours_a_cgroup_cpu_quota(tmp_path):
    cores = configmod.default_dns_workers(str(tmp_path / "none"))  # no cgroup files: the cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # v2: 1.5 CPUs -> 2 workers at most
    assert configmod.cgroup_cpu_quota(str(tmp_path)) == 1.5
    assert configmod.default_dns_workers(str(tmp_path)) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one worker
    assert configmod.default_dns_workers(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")  # unlimited
    assert configmod.cgroup_cpu_quota(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert configmod.cgroup_cpu_quota(str(v1)) == 1.0 and configmod.default_dns_workers(str(v1)) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert configmod.cgroup_cpu_quota(str(v1)) is None
