"""Remote bad input over HTTP(S): each URL fails alone, with a reason a person can act on, within the byte and
time limits, and a run over all of them explains the good ones and goes on.

The servers are real (``http.server`` on 127.0.0.1, in a thread; one with TLS). Loopback is closed by default
(tests/test_uri_policy.py), so these tests open exactly 127.0.0.1/32 with SALIENT_ALLOWED_NETWORKS.
"""

from __future__ import annotations

import http.server
import io
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, read_uri

CAP = 50_000  # bytes
TIMEOUT = 1.0  # seconds
LOOPBACK = {"allowed_networks": "127.0.0.1/32", "http_timeout": TIMEOUT}


def png_bytes(colour=(200, 40, 40), size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    """One behaviour per path; every request is recorded as (path, Host header) on the server."""

    protocol_version = "HTTP/1.1"  # chunked answers need it; every answer below says how it ends

    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, body: bytes = b"", content_type: str | None = "image/png",
               length: int | None = -1, close: bool = True) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: C901 - a table of behaviours
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        self.server.requests.append((path, self.headers.get("Host")))
        if path == "/good.png":
            self.answer(200, PNG)
        elif path == "/octet.png":
            self.answer(200, PNG, "application/octet-stream")
        elif path == "/untyped.png":
            self.answer(200, PNG, None)
        elif path == "/page.html":
            self.answer(200, b"<html><body>Sign in to see this image</body></html>", "text/html; charset=utf-8")
        elif path == "/data.json":
            self.answer(200, b'{"error": "no"}', "application/json")
        elif path == "/gone.png":
            self.answer(404, b"not here", "text/plain")
        elif path == "/broken.png":
            self.answer(500, b"oops", "text/plain")
        elif path == "/flaky.png":
            self.server.flaky += 1
            if self.server.flaky == 1:
                self.answer(503, b"busy", "text/plain")
            else:
                self.answer(200, PNG)
        elif path == "/silent.png":  # never answers within the timeout
            time.sleep(TIMEOUT * 4)
            self.answer(200, PNG)
        elif path == "/dribble.png":  # headers at once, then a byte every 0.1 s: each read is quick
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            for i in range(len(PNG)):
                try:
                    self.wfile.write(PNG[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
        elif path == "/trickle.bin":  # 20 bytes over 2 s: a slow but steady download
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "20")
            self.end_headers()
            for i in range(20):
                self.wfile.write(bytes([i]))
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/stall.png":  # half the body at once, then silence
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG[: len(PNG) // 2])
            self.wfile.flush()
            time.sleep(TIMEOUT * 4)
            self.close_connection = True
        elif path == "/huge-announced.png":  # says 1 GB, sends a little and waits
            self.answer(200, PNG[:100], length=10**9)
            time.sleep(TIMEOUT * 2)
        elif path == "/endless.png":  # no Content-Length: the body ends when the connection closes
            self.answer(200, b"\x89PNG" + b"\x00" * (CAP * 4), length=None)
        elif path == "/chunked.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(8):
                block = b"\x00" * (CAP // 4)
                self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/lies-low.png":  # says 100 bytes, sends 40 times the cap
            self.answer(200, b"\x89PNG" + b"\x00" * (CAP * 40), length=100)
        elif path == "/lies-high.png":  # says 5000 bytes, sends 100 and closes
            self.answer(200, PNG[:100], length=5000)
        elif path == "/empty.png":
            self.answer(200, b"")
        elif path.startswith("/hops/"):
            left = int(path.rsplit("/", 1)[1])
            self.redirect(f"/hops/{left - 1}" if left > 0 else "/good.png")
        elif path == "/to":
            self.redirect(query["url"][0], int(query.get("status", ["302"])[0]))
        else:
            self.answer(404, b"", "text/plain")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str]] = []
        self.flaky = 0
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address) -> None:
        pass  # salient hanging up early (over the cap, past the deadline) is what these tests are about

    def url(self, path: str, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.server_address[1]}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.shutdown()


def read(url: str, cap: int = CAP, image: bool = True, **settings) -> bytes:
    return read_uri(url, cap, Settings(**{**LOOPBACK, **settings}), expect_image=image)


def fails(url: str, pattern: str | None, **settings) -> str:
    with pytest.raises(SourceError, match=pattern) as info:
        read(url, **settings)
    return str(info.value)


# --- answers that are images -----------------------------------------------------------------------------------

def test_images_served_as_image_or_plain_bytes_are_read(server):
    assert read(server.url("/good.png")) == PNG
    assert read(server.url("/octet.png")) == PNG  # decided: generic bytes pass; the decoder judges them
    assert read(server.url("/untyped.png")) == PNG


def test_a_transient_5xx_is_retried(server):
    assert read(server.url("/flaky.png")) == PNG
    assert server.hits("/flaky.png") == 2


# --- answers that fail the item --------------------------------------------------------------------------------

@pytest.mark.parametrize("path, reason", [
    ("/page.html", "^not an image: the server says Content-Type text/html$"),
    ("/data.json", "^not an image: the server says Content-Type application/json$"),
    ("/gone.png", "^HTTP 404 Not Found$"),
    ("/empty.png", "^empty response$"),
    ("/lies-high.png", "^connection closed after 100 of the 5000 bytes announced$"),
])
def test_bad_answers_fail_at_once_with_the_reason(server, path, reason):
    fails(server.url(path), reason)
    assert server.hits(path) == 1  # none of these is worth a second request


def test_content_type_is_judged_only_for_images(server):
    page = read(server.url("/page.html"), image=False)  # a manifest or labels file may well be text
    assert page.startswith(b"<html>")


def test_a_5xx_that_stays_fails_after_three_attempts(server):
    fails(server.url("/broken.png"), "^HTTP 500 Internal Server Error$")
    assert server.hits("/broken.png") == 3


@pytest.mark.parametrize("path", ["/silent.png", "/dribble.png", "/stall.png"])
def test_a_slow_server_fails_at_the_deadline_and_is_not_retried(server, path):
    started = time.monotonic()
    fails(server.url(path), r"^no complete answer within 1s \(SALIENT_HTTP_TIMEOUT\)$")
    # Not early; and the reason says the deadline ended it, not the server (whose answer would have come
    # complete, after 4 s or, dribbled, after ~len(PNG) / 10 s). No upper bound: a loaded machine is late.
    assert time.monotonic() - started >= TIMEOUT * 0.9
    assert server.hits(path) == 1


def test_other_downloads_may_take_long_but_never_stall(server):
    """Weights and manifests are not images: they may take longer than the timeout while bytes keep coming."""
    started = time.monotonic()
    assert read(server.url("/trickle.bin"), image=False) == bytes(range(20))
    assert time.monotonic() - started > TIMEOUT
    fails(server.url("/trickle.bin"), r"^no complete answer within 1s")  # an image may not
    with pytest.raises(SourceError, match=r"^no data for 1s \(SALIENT_HTTP_TIMEOUT\)$"):
        read(server.url("/stall.png"), image=False)


@pytest.mark.parametrize("path, reason", [
    ("/huge-announced.png", rf"^response is 1000000000 bytes, over the limit of {CAP}$"),
    ("/endless.png", rf"^response is over the limit of {CAP} bytes$"),
    ("/chunked.png", rf"^response is over the limit of {CAP} bytes$"),
])
def test_the_byte_limit_holds_whatever_the_headers_say(server, path, reason):
    fails(server.url(path), reason)  # refused on the header or at the cap: at the deadline the reason would say so


def test_a_content_length_below_the_truth_cannot_make_salient_read_more(server):
    data = read(server.url("/lies-low.png"))
    assert data == b"\x89PNG" + b"\x00" * 96  # exactly what was announced, never the 2 MB that followed


def test_unreachable_and_unresolvable_hosts_fail_the_item(monkeypatch):
    from salient_maps.storage import sources

    monkeypatch.setattr(sources, "HTTP_ATTEMPTS", 1)  # these are retried; the retry is test_a_transient_5xx's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    fails(f"http://127.0.0.1:{port}/a.png", "^cannot fetch: Connection refused$")
    fails("http://no-such-host.invalid/a.png", "^cannot resolve no-such-host.invalid: ")


@pytest.mark.parametrize("url, reason", [
    ("http://example.com:99999/a.png", "^the URL's port is not a number from 0 to 65535$"),
    ("http:///a.png", "^the URL names no host$"),
    ("http://user@example.com/a.png", "^URLs with a user name or password are not supported$"),
])
def test_malformed_urls_fail_before_any_lookup(url, reason, monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("a name was looked up")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    fails(url, reason)


# --- redirects -------------------------------------------------------------------------------------------------

def test_redirects_are_followed_up_to_the_limit(server):
    assert read(server.url("/hops/4")) == PNG  # 5 redirects
    fails(server.url("/hops/5"), r"^more than 5 redirects \(SALIENT_HTTP_MAX_REDIRECTS\)$")
    assert read(server.url("/hops/1"), http_max_redirects=2) == PNG
    fails(server.url("/hops/0"), "^more than 0 redirects", http_max_redirects=0)


def test_a_redirect_to_a_closed_address_is_refused_without_a_connection(server):
    canary = socket.socket()
    canary.bind(("127.0.0.2", 0))  # loopback, but not the 127.0.0.1/32 these tests open
    canary.listen(4)
    canary.settimeout(0.2)
    try:
        targets = {
            f"http://127.0.0.2:{canary.getsockname()[1]}/a.png": "redirect 1: 127.0.0.2 is a loopback address",
            "http://169.254.169.254/latest/meta-data/": "redirect 1: 169.254.169.254 is a link-local address",
            "http://[::ffff:169.254.169.254]/": "redirect 1: ::ffff:a9fe:a9fe is a link-local address",
            f"http://0x7f000002:{canary.getsockname()[1]}/": "redirect 1: 0x7f000002 resolves to 127.0.0.2",
            "file:///etc/passwd": "redirected to a file URI, which is not followed",
            "gopher://127.0.0.1:70/": "redirected to a gopher URI, which is not followed",
        }
        for target, words in targets.items():
            for status in ("301", "307"):
                message = fails(server.url(f"/to?url={target}&status={status}"), None)
                assert words in message, (target, message)
        with pytest.raises(TimeoutError):
            canary.accept()  # nobody came
    finally:
        canary.close()
    # deeper in a chain, too
    fails(server.url("/to?url=/to%3Furl%3Dhttp://169.254.169.254/"), "^refused: redirect 2: 169.254.169.254")


# --- TLS: the checked address, the original name ---------------------------------------------------------------

def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_connects_to_the_vetted_address_and_checks_the_certificate_against_the_name(tmp_path, monkeypatch):
    cert, key = make_certificate(tmp_path, "images.test")
    seen_names: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen_names.append(name)
    tls_server = Server(context)
    real = socket.getaddrinfo
    lookups: list[str] = []

    def dns(host, port, *args, **kwargs):  # a mock of DNS only: two made-up names for 127.0.0.1
        lookups.append(host)
        if host in ("images.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate, and only it
    try:
        assert read(tls_server.url("/good.png", "https", "images.test")) == PNG
        assert seen_names == ["images.test"]  # SNI carries the name, not the address
        assert tls_server.requests[-1] == ("/good.png", f"images.test:{tls_server.server_address[1]}")
        names = [host for host in lookups if not host[0].isdigit()]  # connecting "looks up" the address itself
        assert names == ["images.test"]  # resolved once; the connection went to that answer
        # the same server under another name: its certificate does not match, so nothing is read
        fails(tls_server.url("/good.png", "https", "other.test"), "^TLS failed: .*(mismatch|match)")
        assert len(tls_server.requests) == 1
    finally:
        tls_server.shutdown()


# --- a run over all of them goes on ----------------------------------------------------------------------------

def test_a_run_over_remote_bad_input_explains_the_good_and_fails_each_bad_one_with_its_reason(
        server, tmp_path, monkeypatch, run_cli):
    expected = {
        "/good.png": None, "/octet.png": None,
        "/page.html": "not an image: the server says Content-Type text/html",
        "/gone.png": "HTTP 404 Not Found", "/broken.png": "HTTP 500 Internal Server Error",
        "/silent.png": "no complete answer within 1s", "/huge-announced.png": "over the limit of 50000",
        "/endless.png": "over the limit of 50000", "/lies-high.png": "connection closed after 100 of the 5000",
        "/to?url=http://169.254.169.254/": "refused: redirect 1: 169.254.169.254 is a link-local address",
    }
    uris = {server.url(path): reason for path, reason in expected.items()}
    uris["gopher://127.0.0.1/a.png"] = "unsupported URI scheme 'gopher'"
    manifest = tmp_path / "remote.jsonl"
    manifest.write_text("".join(json.dumps({"uri": u}) + "\n" for u in uris))
    monkeypatch.setenv("SALIENT_ALLOWED_NETWORKS", "127.0.0.1/32")
    monkeypatch.setenv("SALIENT_HTTP_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("SALIENT_MAX_IMAGE_BYTES", str(CAP))
    out = run_cli(["run", manifest, "--model", "resnet18", "--methods", "gradcam", "--topk", "1", "--device", "cpu",
                   "--out", tmp_path / "data"]).output
    assert "done 2, failed 9, skipped 0" in out, out
    records = {}
    for line in run_cli(["results", "--out", tmp_path / "data", "--format", "jsonl"]).output.splitlines():
        record = json.loads(line)
        records.setdefault(record["uri"], record)
    assert set(records) == set(uris)
    for uri, reason in uris.items():
        record = records[uri]
        if reason is None:
            assert record["status"] == "done" and record["error"] is None, record
        else:
            assert record["status"] == "failed" and reason in record["error"], (uri, record["error"])
