"""`cluster derpmap`: the output must load as Tailscale's tailcfg.DERPMap and as headscale's derp file.

The schema tables below are written from tailcfg/derpmap.go (tailscale/tailscale) field by field:
names are the JSON names Go emits (struct field name unless a json tag renames it), types are the
JSON types Go's encoder produces for them. The checker is stricter than Go's decoder on purpose:
exact case, no unknown fields, so a misspelt field fails here instead of being silently dropped by
a Tailscale client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.config import ConfigError, load_config
from cluster.derpmap import build_derpmap, headscale_yaml, to_headscale

ROOT = Path(__file__).resolve().parents[2]

NUMBER = (int, float)

#: tailcfg.DERPMap. Regions is map[int]*DERPRegion: a JSON object keyed by decimal strings.
#: OmitDefaultRegions carries the tag `json:"omitDefaultRegions,omitempty"`.
DERPMAP_FIELDS: dict[str, Any] = {"HomeParams": dict, "Regions": dict, "omitDefaultRegions": bool}
DERPMAP_REQUIRED = {"Regions"}

#: tailcfg.DERPRegion (Latitude/Longitude are float64, so any JSON number).
REGION_FIELDS: dict[str, Any] = {
    "RegionID": int, "RegionCode": str, "RegionName": str, "Latitude": NUMBER, "Longitude": NUMBER,
    "Avoid": bool, "NoMeasureNoHome": bool, "Nodes": list,
}
REGION_REQUIRED = {"RegionID", "RegionCode", "RegionName", "Nodes"}

#: tailcfg.DERPNode.
NODE_FIELDS: dict[str, Any] = {
    "Name": str, "RegionID": int, "HostName": str, "CertName": str, "IPv4": str, "IPv6": str,
    "STUNPort": int, "STUNOnly": bool, "DERPPort": int, "InsecureForTests": bool, "STUNTestIP": str,
    "CanPort80": bool,
}
NODE_REQUIRED = {"Name", "RegionID", "HostName"}


def _check_type(where: str, value: Any, want: Any) -> None:
    # JSON true/false must not pass for an int field (Python's bool is an int)
    ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
    assert ok, f"{where}: {value!r} is {type(value).__name__}, tailcfg wants {want}"


def _check_object(where: str, doc: Any, fields: dict[str, Any], required: set[str]) -> None:
    assert isinstance(doc, dict), f"{where}: want an object, got {doc!r}"
    unknown = set(doc) - set(fields)
    assert not unknown, f"{where}: fields tailcfg does not have: {sorted(unknown)}"
    missing = required - set(doc)
    assert not missing, f"{where}: missing {sorted(missing)}"
    for key, value in doc.items():
        _check_type(f"{where}.{key}", value, fields[key])


def check_tailcfg_derpmap(doc: Any) -> None:
    """Assert doc (parsed JSON) has exactly the shape encoding/json gives tailcfg.DERPMap."""
    _check_object("DERPMap", doc, DERPMAP_FIELDS, DERPMAP_REQUIRED)
    names: set[str] = set()
    for key, region in doc["Regions"].items():
        assert key.isdigit() and str(int(key)) == key, f"Regions key {key!r} is not a decimal int"
        where = f"Regions[{key}]"
        _check_object(where, region, REGION_FIELDS, REGION_REQUIRED)
        assert region["RegionID"] == int(key), f"{where}: RegionID {region['RegionID']} != key"
        assert region["Nodes"], f"{where}: no nodes"
        for i, node in enumerate(region["Nodes"]):
            _check_object(f"{where}.Nodes[{i}]", node, NODE_FIELDS, NODE_REQUIRED)
            assert node["RegionID"] == region["RegionID"], f"{where}.Nodes[{i}]: RegionID mismatch"
            assert node["Name"] not in names, f"node name {node['Name']} not unique across regions"
            names.add(node["Name"])
            assert -1 <= node.get("STUNPort", 0) <= 65535
            assert 0 <= node.get("DERPPort", 0) <= 65535


def check_headscale_yaml(doc: Any) -> None:
    """Assert doc (parsed YAML) decodes with yaml.v3 into tailcfg.DERPMap as headscale does it.

    yaml.v3 without yaml tags keys fields by the Go name lower-cased and matches case-sensitively;
    map[int] keys must be YAML integers.
    """
    lower = {name.lower(): want for name, want in DERPMAP_FIELDS.items()}
    assert set(doc) <= set(lower) and "regions" in doc, f"top level: {sorted(doc)}"
    region_fields = {name.lower(): want for name, want in REGION_FIELDS.items()}
    node_fields = {name.lower(): want for name, want in NODE_FIELDS.items()}
    for key, region in doc["regions"].items():
        assert isinstance(key, int) and not isinstance(key, bool), f"region key {key!r} is not a YAML int"
        _check_object(f"regions[{key}]", region, region_fields, {r.lower() for r in REGION_REQUIRED})
        assert region["regionid"] == key
        for i, node in enumerate(region["nodes"]):
            _check_object(f"regions[{key}].nodes[{i}]", node, node_fields, {n.lower() for n in NODE_REQUIRED})
            assert node["regionid"] == key


def run_cluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


TWO_REGIONS = """
[[regions]]
region_id = 901
code = "sz"
name = "Shenzhen"
latitude = 22.5
longitude = 114

[[regions.nodes]]
name = "901a"
hostname = "derp1.example.com"
ipv4 = "203.0.113.7"
ipv6 = "2001:db8::7"

[[regions.nodes]]
name = "901b"
hostname = "203.0.113.8"
ipv4 = "203.0.113.8"
ipv6 = "none"
derp_port = 8443
stun_port = -1
cert_name = "sha256-raw:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

[[regions]]
region_id = 902
code = "dev"
name = "Loopback dev"
nodes = [{hostname = "127.0.0.1", ipv4 = "127.0.0.1", derp_port = 3340, stun_port = 3478, insecure_for_tests = true}]
"""


@pytest.fixture
def regions_toml(tmp_path: Path) -> Path:
    path = tmp_path / "regions.toml"
    path.write_text(TWO_REGIONS)
    return path


# -- the checker itself: it must reject what Go would mangle -------------------------------------------


def test_schema_checker_rejects_wrong_names_and_types() -> None:
    good = {"Regions": {"900": {"RegionID": 900, "RegionCode": "x", "RegionName": "X",
                                "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "h"}]}}}
    check_tailcfg_derpmap(good)
    bad_cases = [
        {**good, "OmitDefaultRegion": True},  # typo
        {"Regions": {"900": {**good["Regions"]["900"], "RegionId": 900}}},  # wrong case
        {"Regions": {"900": {**good["Regions"]["900"], "Nodes": [{"Name": "a", "RegionID": 900, "HostName": "h",
                                                                  "STUNPort": "3478"}]}}},  # string port
        {"Regions": {"900": {**good["Regions"]["900"], "Nodes": [{"Name": "a", "RegionID": 900, "HostName": "h",
                                                                  "DERPPort": True}]}}},  # bool port
        {"Regions": {"x": good["Regions"]["900"]}},  # non-numeric key
    ]
    for bad in bad_cases:
        with pytest.raises(AssertionError):
            check_tailcfg_derpmap(bad)


# -- tailscale policy-file JSON ------------------------------------------------------------------------


def test_single_node_from_flags_matches_tailcfg() -> None:
    proc = run_cluster("derpmap", "--listen", "127.0.0.1:3340", "--stun", "127.0.0.1:3478")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_tailcfg_derpmap(doc)
    assert doc["omitDefaultRegions"] is True
    node = doc["Regions"]["900"]["Nodes"][0]
    assert node == {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                    "STUNPort": 3478, "DERPPort": 3340, "InsecureForTests": True}


def test_single_node_without_stun_says_stun_off() -> None:
    proc = run_cluster("derpmap", "--listen", "127.0.0.1:3340", "--no-stun", "--hostname", "derp.example.com",
                       "--region-id", "950", "--region-code", "ams", "--region-name", "Amsterdam")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_tailcfg_derpmap(doc)
    region = doc["Regions"]["950"]
    assert (region["RegionCode"], region["RegionName"]) == ("ams", "Amsterdam")
    assert region["Nodes"][0]["STUNPort"] == -1
    assert region["Nodes"][0]["HostName"] == "derp.example.com"
    assert "IPv4" not in region["Nodes"][0]  # a DNS name is resolved by clients, not pinned


def test_regions_config_matches_tailcfg(regions_toml: Path) -> None:
    proc = run_cluster("derpmap", "--config", str(regions_toml))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_tailcfg_derpmap(doc)
    assert sorted(doc["Regions"]) == ["901", "902"]
    sz = doc["Regions"]["901"]
    assert (sz["RegionCode"], sz["RegionName"], sz["Latitude"], sz["Longitude"]) == ("sz", "Shenzhen", 22.5, 114.0)
    a, b = sz["Nodes"]
    assert a == {"Name": "901a", "RegionID": 901, "HostName": "derp1.example.com", "IPv4": "203.0.113.7",
                 "IPv6": "2001:db8::7", "STUNPort": 3478, "DERPPort": 443}
    assert b["CertName"].startswith("sha256-raw:") and b["STUNPort"] == -1 and b["DERPPort"] == 8443
    assert b["IPv6"] == "none"
    # Production nodes stay verified even though this config's own certmode is the default (dev).
    assert "InsecureForTests" not in a and "InsecureForTests" not in b
    dev = doc["Regions"]["902"]["Nodes"][0]
    assert dev["Name"] == "902a" and dev["InsecureForTests"] is True


def test_omit_default_regions_can_be_turned_off(regions_toml: Path) -> None:
    proc = run_cluster("derpmap", "--config", str(regions_toml), "--no-omit-default-regions")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_tailcfg_derpmap(doc)
    assert "omitDefaultRegions" not in doc  # Go's omitempty leaves false out


# -- headscale -----------------------------------------------------------------------------------------


def test_headscale_yaml_decodes_like_yaml_v3(regions_toml: Path) -> None:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with the test extras (kubernetes-validate)
    proc = run_cluster("derpmap", "--config", str(regions_toml), "--format", "headscale")
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(proc.stdout)
    check_headscale_yaml(doc)
    # Same content as the policy-file JSON, field for field.
    tailscale = json.loads(run_cluster("derpmap", "--config", str(regions_toml)).stdout)
    for rid, region in tailscale["Regions"].items():
        got = doc["regions"][int(rid)]
        for key, value in region.items():
            if key != "Nodes":
                assert got[key.lower()] == value
        assert got["nodes"] == [{k.lower(): v for k, v in node.items()} for node in region["Nodes"]]


def test_headscale_yaml_keeps_strings_strings() -> None:
    yaml = pytest.importorskip("yaml")
    doc = {"Regions": {"900": {"RegionID": 900, "RegionCode": "yes", "RegionName": "1e3", "Nodes": [
        {"Name": "900a", "RegionID": 900, "HostName": "h", "IPv6": "::1", "IPv4": "none"}]}}}
    parsed = yaml.safe_load(headscale_yaml(to_headscale(doc)))
    region = parsed["regions"][900]
    # unquoted, YAML would turn these into a bool and a float
    assert region["regioncode"] == "yes" and region["regionname"] == "1e3"
    assert region["nodes"][0]["ipv6"] == "::1" and region["nodes"][0]["ipv4"] == "none"


def test_headscale_json_is_what_derp_urls_decode(regions_toml: Path) -> None:
    proc = run_cluster("derpmap", "--config", str(regions_toml), "--format", "headscale", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    check_tailcfg_derpmap(doc)
    # headscale drops the flag when merging maps; leaving it out avoids implying it works there.
    assert "omitDefaultRegions" not in doc


# -- config errors name the key ------------------------------------------------------------------------


@pytest.mark.parametrize(("snippet", "message"), [
    ('region_id = 901\nnodes = [{hostname = "h", stunport = -1}]', "unknown key(s) stunport"),
    ('region_id = 901\nnodes = [{hostname = "h", ipv4 = "2001:db8::1"}]', "not an IPv4 address"),
    ('region_id = 901\nnodes = [{hostname = "h", stun_port = true}]', "stun_port: want an integer"),
    ('region_id = 901\nnodes = [{hostname = "h", derp_port = 70000}]', "out of range"),
    ('region_id = 901\nnodes = [{hostname = "h", cert_name = "sha256-raw:abc"}]', "64 hex digits"),
    ('region_id = 901\nnodes = [{ipv4 = "192.0.2.1"}]', "needs a hostname"),
    ('region_id = 42\nnodes = [{hostname = "h"}]', "start at 900"),
    ("region_id = 901\nnodes = []", "at least one node"),
    ('region_id = 901\ncolour = "red"\nnodes = [{hostname = "h"}]', "unknown key(s) colour"),
])
def test_bad_region_tables_are_refused(tmp_path: Path, snippet: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[regions]]\n" + snippet + "\n")
    proc = run_cluster("derpmap", "--config", str(path))
    assert proc.returncode == 2, proc.stdout
    assert "config error" in proc.stderr and message in proc.stderr, proc.stderr


def test_duplicate_ids_and_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text('[[regions]]\nregion_id = 901\nnodes = [{name = "n1", hostname = "a"}]\n'
                    '[[regions]]\nregion_id = 902\nnodes = [{name = "n1", hostname = "b"}]\n')
    with pytest.raises(ConfigError, match=r"n1.*unique across all regions"):
        build_derpmap(load_config(path))
    path.write_text('[[regions]]\nregion_id = 901\nnodes = [{hostname = "a"}]\n'
                    '[[regions]]\nregion_id = 901\nnodes = [{hostname = "b"}]\n')
    with pytest.raises(ConfigError, match="appears twice"):
        build_derpmap(load_config(path))


def test_derpmap_of_a_running_cluster_lists_every_node_its_mesh_knows(tmp_path: Path) -> None:
    """`cluster derpmap --running` on node a prints b too, with b's own ports, region and CertName."""
    import os

    from tests.support import ClusterProcess, free_port_range, wait_until

    secret = tmp_path / "mesh.secret"
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)
    mesh_a, mesh_b = free_port_range(2), free_port_range(1)
    common = ("--mesh-secret-file", str(secret))
    a = ClusterProcess("--node-name", "a", "--mesh-listen", f"127.0.0.1:{mesh_a}", "--region-id", "901",
                       "--region-code", "ams", "--region-name", "Amsterdam", *common, workers=2)
    b = ClusterProcess("--node-name", "b", "--mesh-listen", f"127.0.0.1:{mesh_b}", "--join", f"127.0.0.1:{mesh_a}",
                       "--region-id", "902", "--region-code", "fra", "--region-name", "Frankfurt",
                       "--certmode", "selfsigned", "--hostname", "127.0.0.1", *common, workers=1)

    def running(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cluster", "derpmap", "--running", "--run-dir", str(a.run_dir),
                               *extra], capture_output=True, text=True, timeout=60)

    with a, b:
        def both() -> dict | None:
            out = running()
            doc = json.loads(out.stdout) if out.returncode == 0 else {}
            return doc if len(doc.get("Regions", {})) == 2 else None

        doc = wait_until(both, timeout=30, what="node a's mesh to know node b's DERP entry")
        ams, fra = doc["Regions"]["901"], doc["Regions"]["902"]
        assert (ams["RegionCode"], ams["RegionName"], fra["RegionCode"], fra["RegionName"]) == \
            ("ams", "Amsterdam", "fra", "Frankfurt")
        (node_a,) = ams["Nodes"]  # two workers, one node entry
        (node_b,) = fra["Nodes"]
        assert (node_a["Name"], node_a["DERPPort"], node_a.get("InsecureForTests")) == ("a", a.port, True)
        assert (node_b["Name"], node_b["DERPPort"], node_b["HostName"]) == ("b", b.port, "127.0.0.1")
        assert node_b["CertName"].startswith("sha256-raw:") and "InsecureForTests" not in node_b
        hs = running("--format", "headscale")
        assert hs.returncode == 0 and "regioncode: \"fra\"" in hs.stdout and f"derpport: {b.port}" in hs.stdout
    gone = running()
    assert gone.returncode == 1 and "no running cluster answers" in gone.stderr
