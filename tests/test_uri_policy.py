"""Hostile URIs are refused before any connection is made or any file is opened (storage/uri_policy.py).

Two witnesses that nothing was touched: a listening socket on loopback that records every connection (the
loopback tricks aim at it), and a spy in place of ``socket.create_connection`` for the addresses no test can
listen on (cloud metadata, private ranges). Each refusal has a control that the same witness does see a
connection once a setting opens the address, so a witness that sees nothing is not simply blind.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest

from salient_maps.storage import sources
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, iter_uris, read_uri, with_command_line_roots
from salient_maps.storage.uri_policy import address_kind

PNG_ANSWER = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: 3\r\n\r\nPNG"


class Canary:
    """A listening socket that counts connections and answers each with a tiny 'image'."""

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1"):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(4096)
                conn.sendall(PNG_ANSWER)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def canary():
    c = Canary()
    yield c
    c.close()


class FakeDNS:
    """Answers for made-up names (a mock of DNS only): ``dns[host] = [addresses]`` or a callable giving
    them at each lookup; every name looked up is recorded in ``lookups``."""

    def __init__(self):
        self.table: dict = {}
        self.lookups: list[str] = []
        self.real = socket.getaddrinfo

    def __setitem__(self, host: str, answer) -> None:
        self.table[host] = answer

    def getaddrinfo(self, host, port, *args, **kwargs):
        self.lookups.append(host)
        answer = self.table.get(host)
        if answer is None:
            return self.real(host, port, *args, **kwargs)
        addresses = answer() if callable(answer) else answer
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]


@pytest.fixture
def fake_dns(monkeypatch):
    dns = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    return dns


@pytest.fixture
def connect_spy(monkeypatch):
    """Every (address, port) salient tries to connect to; the attempt itself is refused at once."""
    attempts: list[tuple[str, int]] = []

    def create_connection(address, *args, **kwargs):
        attempts.append(address[:2])
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(sources, "HTTP_ATTEMPTS", 1)  # a refused connection is retried; once is enough here
    return attempts


def refused(uri: str, settings: Settings) -> str:
    with pytest.raises(SourceError, match="^refused: ") as info:
        read_uri(uri, 1000, settings)
    return str(info.value)


# --- what an address is ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, kind", [
    ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("2002:808:808::", None), ("64:ff9b::808:808", None),
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"), ("2002:7f00:1::", "loopback"), ("64:ff9b::7f00:1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fd00:ec2::254", "link-local"),
    ("::ffff:169.254.169.254", "link-local"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("fd12:3456::1", "private"), ("192.0.2.1", "private"), ("198.18.0.1", "private"), ("2001:db8::1", "private"),
    ("100.64.0.1", "shared (carrier-grade NAT)"), ("100.127.255.254", "shared (carrier-grade NAT)"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("::127.0.0.1", "reserved"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
])
def test_address_kinds(address, kind):
    assert address_kind(ipaddress.ip_address(address)) == kind


# --- refused before any connection -----------------------------------------------------------------------------

LOOPBACK_FORMS = [
    "http://127.0.0.1:{port}/a.png", "https://127.0.0.1:{port}/a.png", "http://localhost:{port}/a.png",
    "http://LocalHost:{port}/a.png", "http://2130706433:{port}/a.png", "http://0x7f.1:{port}/a.png",
    "http://0x7f000001:{port}/a.png", "http://127.1:{port}/a.png", "http://0177.0.0.1:{port}/a.png",
    "http://017700000001:{port}/a.png", "http://[::ffff:127.0.0.1]:{port}/a.png",
    "http://[::ffff:7f00:1]:{port}/a.png", "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/a.png",
    "http://0.0.0.0:{port}/a.png", "http://0:{port}/a.png", "http://images.test:{port}/a.png",
]


def test_loopback_in_every_spelling_is_refused_without_a_connection(canary, fake_dns):
    fake_dns["images.test"] = ["127.0.0.1"]
    for form in LOOPBACK_FORMS:
        message = refused(form.format(port=canary.port), Settings())
        assert "loopback" in message or "unspecified" in message, (form, message)
    assert canary.connections == 0
    # control: opened, the same canary does see salient
    assert read_uri(f"http://images.test:{canary.port}/a.png", 1000, Settings(allow_private_networks=True)) == b"PNG"
    assert canary.connections == 1


def test_ipv6_loopback_is_refused_without_a_connection():
    try:
        canary = Canary(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert "::1 is a loopback address" in refused(f"http://[::1]:{canary.port}/a.png", Settings())
        assert canary.connections == 0
        assert read_uri(f"http://[::1]:{canary.port}/a.png", 1000, Settings(allow_private_networks=True)) == b"PNG"
        assert canary.connections == 1
    finally:
        canary.close()


@pytest.mark.parametrize("uri, words", [
    ("http://169.254.169.254/latest/meta-data/iam/", "link-local address, where cloud metadata"),
    ("http://[fe80::1]/a.png", "link-local"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local address (IPv4 169.254.169.254 inside IPv6)"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),
    ("http://[2002:a9fe:a9fe::]/", "link-local"),
    ("http://10.0.0.1/a.png", "private"), ("http://172.16.0.1/a.png", "private"),
    ("http://192.168.1.1/a.png", "private"), ("http://[fc00::1]/a.png", "private"),
    ("http://100.64.0.1/a.png", "shared (carrier-grade NAT)"), ("http://240.0.0.1/a.png", "reserved"),
    ("http://255.255.255.255/a.png", "reserved"), ("http://224.0.0.1/a.png", "multicast"),
    ("http://[ff02::1]/a.png", "multicast"), ("https://metadata.test/computeMetadata/v1/", "link-local"),
])
def test_non_public_addresses_are_refused_without_a_connection(uri, words, connect_spy, fake_dns):
    fake_dns["metadata.test"] = ["169.254.169.254"]
    assert words in refused(uri, Settings())
    assert connect_spy == []


def test_private_networks_setting_opens_private_but_never_metadata_unspecified_or_multicast(connect_spy):
    opened = Settings(allow_private_networks=True)
    with pytest.raises(SourceError, match="Connection refused"):  # attempted: the spy refused it
        read_uri("http://10.0.0.1/a.png", 1000, opened)
    assert connect_spy == [("10.0.0.1", 80)]
    for uri in ("http://169.254.169.254/", "http://[fe80::1]/", "http://0.0.0.0/", "http://224.0.0.1/"):
        refused(uri, opened)
    assert connect_spy == [("10.0.0.1", 80)]


def test_allowed_networks_open_exactly_their_cidrs(canary):
    settings = Settings(allowed_networks="127.0.0.1/32")
    assert read_uri(f"http://127.0.0.1:{canary.port}/a.png", 1000, settings) == b"PNG"
    for uri in (f"http://127.0.0.2:{canary.port}/", f"http://[::1]:{canary.port}/", "http://10.0.0.1/"):
        refused(uri, settings)
    assert canary.connections == 1


def test_only_allowed_networks_open_metadata_and_nothing_opens_non_servers(connect_spy):
    settings = Settings(allowed_networks="169.254.169.254/32")
    refused("http://169.254.169.253/", settings)
    with pytest.raises(SourceError, match="Connection refused"):  # attempted: the spy refused it
        read_uri("http://169.254.169.254/latest/meta-data/", 1000, settings)
    assert connect_spy == [("169.254.169.254", 80)]
    everything = Settings(allowed_networks="0.0.0.0/0,::/0", allow_private_networks=True)
    for uri in ("http://0.0.0.0/", "http://224.0.0.1/", "http://[::]/", "http://[ff02::1]/"):
        assert "never an image server" in refused(uri, everything)
    assert connect_spy == [("169.254.169.254", 80)]


def test_a_name_is_resolved_once_and_only_its_allowed_addresses_are_dialled(connect_spy, fake_dns):
    fake_dns["mixed.test"] = ["127.0.0.1", "8.8.8.8", "169.254.169.254", "8.8.4.4"]
    with pytest.raises(SourceError, match="Connection refused"):
        read_uri("http://mixed.test/a.png", 1000, Settings())
    assert connect_spy == [("8.8.8.8", 80), ("8.8.4.4", 80)]
    # DNS rebinding: a public answer when checked, loopback at the next lookup; there is no next lookup
    answers = iter([["8.8.8.8"], ["127.0.0.1"], ["127.0.0.1"]])
    fake_dns["rebind.test"] = lambda: next(answers)
    connect_spy.clear()
    with pytest.raises(SourceError, match="Connection refused"):
        read_uri("http://rebind.test/a.png", 1000, Settings())
    assert connect_spy == [("8.8.8.8", 80)]
    assert fake_dns.lookups.count("rebind.test") == 1


def test_an_international_name_is_checked_by_its_ascii_form(connect_spy, fake_dns):
    fake_dns["xn--bcher-kva.test"] = ["127.0.0.1"]
    assert "xn--bcher-kva.test resolves to 127.0.0.1, a loopback address" in refused("http://bücher.test/a.png",
                                                                                    Settings())
    assert connect_spy == []


def test_every_refusal_names_the_setting_that_would_open_it():
    assert "SALIENT_ALLOW_PRIVATE_NETWORKS=true or SALIENT_ALLOWED_NETWORKS" in refused("http://10.1.1.1/", Settings())
    assert "only SALIENT_ALLOWED_NETWORKS opens it" in refused("http://169.254.169.254/", Settings())
    assert "SALIENT_FILE_ROOTS" in refused("file:///etc/hostname", Settings(file_roots=[]))
    assert "SALIENT_S3_BUCKETS" in refused("s3://other/a.png", Settings(s3_buckets="mine"))


def test_settings_read_comma_separated_lists_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SALIENT_FILE_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("SALIENT_ALLOWED_NETWORKS", "10.1.0.0/16,fd00::/8")
    monkeypatch.setenv("SALIENT_S3_BUCKETS", "photos,scans")
    settings = Settings()
    assert settings.file_roots == [tmp_path / "a", tmp_path / "b"]
    assert settings.allowed_networks == [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")]
    assert settings.s3_buckets == ["photos", "scans"]
    for name in ("SALIENT_FILE_ROOTS", "SALIENT_ALLOWED_NETWORKS", "SALIENT_S3_BUCKETS"):
        monkeypatch.delenv(name)
    defaults = Settings()
    assert (defaults.file_roots, defaults.allowed_networks, defaults.s3_buckets) == ([], [], [])
    assert not defaults.allow_private_networks and defaults.http_max_redirects == 5


# --- local files -----------------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """root/ with an image, a symlink out, a symlink in, and a secret next to root; a sibling named root-evil."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"inside")
    (outside / "secret.png").write_bytes(b"secret")
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "in.png").symlink_to(root / "sub" / "a.png")
    (tmp_path / "root-evil").mkdir()
    (tmp_path / "root-evil" / "b.png").write_bytes(b"evil")
    (tmp_path / "link-to-root").symlink_to(root)
    return tmp_path


def test_files_outside_the_roots_are_refused_through_dotdot_and_symlinks(tree):
    settings = Settings(file_roots=[tree / "root"])
    assert read_uri((tree / "root" / "sub" / "a.png").as_uri(), 100, settings) == b"inside"
    assert read_uri((tree / "root" / "in.png").as_uri(), 100, settings) == b"inside"
    for uri in [(tree / "outside" / "secret.png").as_uri(),
                (tree / "root" / "out.png").as_uri(),  # a symlink inside, pointing out
                f"{(tree / 'root' / 'sub').as_uri()}/../../outside/secret.png",
                f"{(tree / 'root').as_uri()}/%2e%2e/outside/secret.png",  # the same, percent-encoded
                (tree / "root-evil" / "b.png").as_uri(),  # shares the root's name as a prefix
                "file:///etc/hostname"]:
        assert "outside the folders of SALIENT_FILE_ROOTS" in refused(uri, settings), uri


def test_a_refusal_says_nothing_about_whether_the_file_exists(tree):
    settings = Settings(file_roots=[tree / "root"])
    assert refused((tree / "outside" / "secret.png").as_uri(), settings) == \
        refused((tree / "outside" / "no-such.png").as_uri(), settings)


def test_a_root_given_through_a_symlink_still_holds_its_files(tree):
    settings = Settings(file_roots=[tree / "link-to-root"])
    assert read_uri((tree / "root" / "sub" / "a.png").as_uri(), 100, settings) == b"inside"
    assert read_uri((tree / "link-to-root" / "sub" / "a.png").as_uri(), 100, settings) == b"inside"
    refused((tree / "link-to-root" / "out.png").as_uri(), settings)


def test_no_local_file_is_readable_by_default(tree, monkeypatch):
    monkeypatch.delenv("SALIENT_FILE_ROOTS", raising=False)
    message = refused((tree / "root" / "sub" / "a.png").as_uri(), Settings())
    assert message == "refused: local files are closed here: SALIENT_FILE_ROOTS names the folders this process may read"


def test_the_command_line_names_what_an_in_process_command_may_read(tree, monkeypatch):
    manifest = tree / "lists" / "m.txt"
    manifest.parent.mkdir()
    manifest.write_text("x.png\n")
    monkeypatch.chdir(tree / "outside")
    settings = with_command_line_roots(Settings(file_roots=[tree / "root-evil"]), [
        str(tree / "root"), (tree / "outside" / "secret.png").as_uri(), str(manifest), "-", "s3://bucket/p",
        "https://example.com/a.png"])
    assert settings.file_roots == [tree / "root-evil", tree / "root", tree / "outside" / "secret.png",
                                   tree / "lists", tree / "outside"]


def test_a_manifest_on_the_command_line_opens_its_own_folder_only(tree, monkeypatch, run_cli):
    """`salient run LIST` with SALIENT_FILE_ROOTS unset: the entries next to the manifest are explained, the
    ones that climb out of its folder (absolute, ``..``, a symlink) fail as refused; the run goes on."""
    from PIL import Image

    monkeypatch.delenv("SALIENT_FILE_ROOTS", raising=False)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tree / "root" / "sub" / "good.png")
    Image.new("RGB", (40, 30), (30, 30, 200)).save(tree / "outside" / "elsewhere.png")
    (tree / "root" / "away.png").symlink_to(tree / "outside" / "elsewhere.png")
    manifest = tree / "root" / "list.txt"
    manifest.write_text(f"sub/good.png\n{tree / 'outside' / 'elsewhere.png'}\n../outside/elsewhere.png\naway.png\n")
    out = run_cli(["run", manifest, "--model", "resnet18", "--methods", "gradcam", "--topk", "1", "--device", "cpu",
                   "--out", tree / "data"]).output
    assert "done 1, failed 3" in out, out
    records = run_cli(["results", "--out", tree / "data", "--format", "jsonl"]).output
    assert records.count("refused: the file is outside the folders of SALIENT_FILE_ROOTS") == 3, records


@pytest.mark.parametrize("field, value", [
    ("weights", "{outside}/model.pt"), ("weights", "file://{outside}/model.pt"), ("labels", "{outside}/labels.json"),
    ("model", "{outside}/scripted.pt"), ("weights", "{root}/../outside/model.pt"),
])
def test_files_a_message_spec_names_are_held_to_the_roots(field, value, tmp_path):
    """A queue message's spec names weights, labels or a TorchScript model (a program) by path: each must lie
    under the file roots, like an image; the spec then fails before anything is opened."""
    from salient_maps.storage.messages import SPEC_DEFAULTS
    from salient_maps.workers.explainers import SpecError, build_processor

    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    for name in ("model.pt", "labels.json", "scripted.pt"):
        (tmp_path / "outside" / name).write_bytes(b"not read")
    spec = {**SPEC_DEFAULTS, "model": "resnet18", "methods": ["gradcam"], "targets": {"topk": 1},
            field: value.format(outside=tmp_path / "outside", root=tmp_path / "root")}
    with pytest.raises(SpecError, match="^refused: the file is outside the folders of SALIENT_FILE_ROOTS"):
        build_processor(spec, Settings(file_roots=[tmp_path / "root"]), None, None, "cpu")


# --- buckets and schemes ---------------------------------------------------------------------------------------

def test_buckets_outside_the_list_are_refused_before_any_request(monkeypatch):
    from salient_maps.storage import s3 as storage_s3

    def no_client(*args, **kwargs):
        raise AssertionError("an S3 client was made")

    monkeypatch.setattr(storage_s3, "s3_client", no_client)
    settings = Settings(s3_buckets="photos")
    assert "bucket 'private' is not one of SALIENT_S3_BUCKETS" in refused("s3://private/a.png", settings)
    with pytest.raises(SourceError, match="^refused: bucket 'private'"):
        list(iter_uris(["s3://private/folder/"], settings))


def test_unknown_schemes_fail_as_uris_from_manifests_too(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('"gopher://host/a.png"\n{"uri": "ftp://host/b.png"}\n"dict://host:11211/stat"\n"c.png"\n')
    uris = list(iter_uris([str(manifest)]))
    assert uris == ["gopher://host/a.png", "ftp://host/b.png", "dict://host:11211/stat", (tmp_path / "c.png").as_uri()]
    for uri, scheme in zip(uris, ("gopher", "ftp", "dict")):
        with pytest.raises(SourceError, match=f"^unsupported URI scheme '{scheme}'$"):
            read_uri(uri, 100, Settings(file_roots=[tmp_path]))


def test_credentials_in_an_http_url_are_not_used(connect_spy):
    with pytest.raises(SourceError, match="^URLs with a user name or password are not supported$"):
        read_uri("http://user:hunter2@example.com/a.png", 100, Settings())
    assert connect_spy == []
