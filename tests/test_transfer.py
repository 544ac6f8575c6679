"""Downloads and uploads (ocpp16.transfer) against real servers on loopback.

HTTP and HTTPS: tests/transfer_servers.HttpServer in this test's trio run
(so the stalled-server test can use trio's MockClock: client and server share
it). FTP: pyftpdlib in a child process, on trio's real clock (the FTP side
waits on a worker thread, which a MockClock would jump over).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from ocpp16.errors import TransferError
from ocpp16.transfer import (
    PROGRESS_INTERVAL,
    Progress,
    discard_partial,
    download,
    redact,
    upload,
)
from tests.transfer_servers import FtpServer, HttpServer, parse_multipart, silent_server

MB = 1024 * 1024
CAP = 64 * MB


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture
def image(www: Path) -> bytes:
    data = payload(MB + 12345)
    (www / "image.tar").write_bytes(data)
    return data


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    out.mkdir()
    return out / "image.tar"


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# Plain file checks, kept out of the async tests (they block for microseconds).
def read(path: Path) -> bytes:
    return path.read_bytes()


def exists(path: Path) -> bool:
    return path.exists()


def size_of(path: Path) -> int:
    return path.stat().st_size


def remove(path: Path) -> None:
    path.unlink()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p != dest)


@pytest.fixture
def ftp_root(tmp_path: Path) -> Path:
    root = tmp_path / "ftp"
    root.mkdir()
    return root


@pytest.fixture
def ftp(ftp_root: Path) -> Iterator[FtpServer]:
    with FtpServer(ftp_root) as server:
        yield server


# --------------------------------------------------------------------------- download


async def test_download_over_http(www: Path, image: bytes, dest: Path) -> None:
    reports: list[Progress] = []
    server = HttpServer(www)
    async with server.running():
        size = await download(server.url("image.tar"), dest, max_bytes=CAP, progress=reports.append)
    assert size == len(image)
    assert read(dest) == image
    assert leftovers(dest) == []  # no part, no sidecar
    (get,) = server.seen("GET")
    assert "range" not in get.headers
    assert reports[0] == Progress(0, len(image))
    assert reports[-1] == Progress(len(image), len(image))
    assert [r.done for r in reports] == sorted(r.done for r in reports)


async def test_download_over_https_with_the_ca_trusted(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www, ca=trustme.CA())
    async with server.running():
        size = await download(
            server.url("image.tar"),
            dest,
            max_bytes=CAP,
            ssl_context=server.client_ssl_context(),
        )
    assert size == len(image)
    assert read(dest) == image


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_download_over_ftp_with_a_password(
    ftp: FtpServer, ftp_root: Path, dest: Path
) -> None:
    data = payload(MB + 7)
    (ftp_root / "fw").mkdir()
    (ftp_root / "fw" / "image.tar").write_bytes(data)
    reports: list[Progress] = []
    assert "%40" in ftp.url("fw/image.tar")  # the password needs percent-decoding
    size = await download(ftp.url("fw/image.tar"), dest, max_bytes=CAP, progress=reports.append)
    assert size == len(data)
    assert read(dest) == data
    assert leftovers(dest) == []
    commands = ftp.commands()
    assert commands[:2] == [f"USER {ftp.user}", "PASS ***"]
    # RFC 1738 §3.2.2: CWD into the directory, then RETR the name; passive.
    assert "CWD fw" in commands
    assert "RETR image.tar" in commands
    assert "PASV" in commands
    assert not any(c.startswith("PORT") for c in commands)
    assert reports[-1] == Progress(len(data), len(data))


async def test_resume_after_a_dropped_connection(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    server.drop_after = 300_000
    async with server.running():
        with pytest.raises(TransferError) as failed:
            await download(server.url("image.tar"), dest, max_bytes=CAP)
        assert failed.value.retryable
        assert not exists(dest)
        assert size_of(part_of(dest)) == 300_000
        reports: list[Progress] = []
        size = await download(server.url("image.tar"), dest, max_bytes=CAP, progress=reports.append)
    assert size == len(image)
    assert read(dest) == image
    assert leftovers(dest) == []
    first, second = server.seen("GET")
    assert "range" not in first.headers
    assert second.headers["range"] == "bytes=300000-"
    # RFC 9110 §13.1.5: guarded by the validator of the first answer.
    assert second.headers["if-range"].startswith('"')
    assert reports[0] == Progress(300_000, len(image))


async def test_server_without_ranges_starts_over(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    server.ranges = False
    server.drop_after = 300_000
    async with server.running():
        with pytest.raises(TransferError):
            await download(server.url("image.tar"), dest, max_bytes=CAP)
        reports: list[Progress] = []
        size = await download(server.url("image.tar"), dest, max_bytes=CAP, progress=reports.append)
    assert size == len(image)
    assert read(dest) == image
    second = server.seen("GET")[1]
    assert second.headers["range"] == "bytes=300000-"  # asked, answered 200: from byte 0
    assert reports[0] == Progress(0, len(image))


async def test_a_file_changed_on_the_server_is_not_spliced_onto_the_part(
    www: Path, image: bytes, dest: Path
) -> None:
    server = HttpServer(www)
    server.drop_after = 300_000
    async with server.running():
        with pytest.raises(TransferError):
            await download(server.url("image.tar"), dest, max_bytes=CAP)
        replaced = payload(len(image), seed=2)
        (www / "image.tar").write_bytes(replaced)
        os.utime(www / "image.tar", (1_700_000_000, 1_700_000_000))
        await download(server.url("image.tar"), dest, max_bytes=CAP)
    assert read(dest) == replaced
    second = server.seen("GET")[1]
    assert "if-range" in second.headers  # the old validator: the server sent it all


async def test_discard_partial_forgets_the_part(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    server.drop_after = 200_000
    async with server.running():
        with pytest.raises(TransferError):
            await download(server.url("image.tar"), dest, max_bytes=CAP)
        assert leftovers(dest) == ["image.tar.part", "image.tar.part.json"]
        discard_partial(dest)
        assert leftovers(dest) == []
        await download(server.url("image.tar"), dest, max_bytes=CAP)
    assert "range" not in server.seen("GET")[1].headers
    assert read(dest) == image


async def test_a_part_of_another_url_is_not_resumed(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    (www / "other.tar").write_bytes(payload(500_000, seed=3))
    server.drop_after = 200_000
    async with server.running():
        with pytest.raises(TransferError):
            await download(server.url("other.tar"), dest, max_bytes=CAP)
        assert exists(part_of(dest))
        await download(server.url("image.tar"), dest, max_bytes=CAP)
    assert read(dest) == image
    assert "range" not in server.seen("GET", "/image.tar")[0].headers


async def test_a_complete_part_is_finished_on_416(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    # All the bytes, then never the end of the response (chunked: without a
    # length, only the last chunk ends it).
    server.chunked = True
    server.stall_after = len(image)
    async with server.running():
        with pytest.raises(TransferError, match="timed out"):
            await download(server.url("image.tar"), dest, max_bytes=CAP, timeout=0.5)
        assert size_of(part_of(dest)) == len(image)
        server.stall_after = None
        size = await download(server.url("image.tar"), dest, max_bytes=CAP)
    assert size == len(image)
    assert read(dest) == image
    assert server.seen("GET")[1].headers["range"] == f"bytes={len(image)}-"


async def test_a_file_over_the_cap_is_refused_by_its_length(
    www: Path, image: bytes, dest: Path
) -> None:
    server = HttpServer(www)
    async with server.running():
        with pytest.raises(TransferError, match="cap") as refused:
            await download(server.url("image.tar"), dest, max_bytes=len(image) - 1)
    assert not refused.value.retryable
    assert not exists(dest)
    assert leftovers(dest) == []


async def test_a_body_beyond_the_cap_is_cut_without_a_length(
    www: Path, image: bytes, dest: Path
) -> None:
    server = HttpServer(www)
    server.chunked = True  # no Content-Length: only the bytes tell
    async with server.running():
        with pytest.raises(TransferError, match="cap") as refused:
            await download(server.url("image.tar"), dest, max_bytes=500_000)
        assert not refused.value.retryable
        assert leftovers(dest) == []
        # Under the cap, the same chunked answer arrives whole.
        assert await download(server.url("image.tar"), dest, max_bytes=CAP) == len(image)
    assert read(dest) == image


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_ftp_file_over_the_cap_is_refused_by_its_size(
    ftp: FtpServer, ftp_root: Path, dest: Path
) -> None:
    (ftp_root / "big.tar").write_bytes(payload(200_000))
    with pytest.raises(TransferError, match="cap") as refused:
        await download(ftp.url("big.tar"), dest, max_bytes=100_000)
    assert not refused.value.retryable
    assert leftovers(dest) == []
    assert "RETR big.tar" not in ftp.commands()


async def test_http_errors_name_the_status(www: Path, dest: Path) -> None:
    server = HttpServer(www)
    server.statuses["/busy.tar"] = 503
    async with server.running():
        with pytest.raises(TransferError, match="HTTP 404 Not Found") as missing:
            await download(server.url("missing.tar"), dest, max_bytes=CAP)
        with pytest.raises(TransferError, match="HTTP 503"):
            await download(server.url("busy.tar"), dest, max_bytes=CAP)
    assert missing.value.url == server.url("missing.tar")
    assert not exists(dest)


async def test_refused_connection(dest: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now: the connection is refused.
    with pytest.raises(TransferError, match="ConnectError") as http:
        await download(f"http://127.0.0.1:{port}/image.tar", dest, max_bytes=CAP)
    assert http.value.retryable
    with pytest.raises(TransferError, match="refused"):
        await download(f"ftp://127.0.0.1:{port}/image.tar", dest, max_bytes=CAP)


@pytest.fixture
def loop_clock() -> trio.testing.MockClock:
    # Virtual time that moves only when every task waits for 50 ms of real
    # time: the server in this run and loopback I/O are done long before that,
    # so the only jump left is to the client's idle deadline.
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_idle_timeout_on_a_stalled_server(
    www: Path, image: bytes, dest: Path, loop_clock: trio.testing.MockClock
) -> None:
    server = HttpServer(www)
    server.stall_after = 100_000
    reports: list[Progress] = []
    async with server.running():
        start = trio.current_time()
        with pytest.raises(TransferError, match="no data for 60 s"):
            await download(
                server.url("image.tar"), dest, max_bytes=CAP, timeout=60, progress=reports.append
            )
        assert trio.current_time() - start == 60
    assert size_of(part_of(dest)) == 100_000  # kept for a resume
    # No virtual time passed while the bytes came: one report, the first.
    assert reports == [Progress(0, len(image))]


async def test_idle_timeout_is_per_byte_not_per_transfer(
    www: Path, dest: Path, loop_clock: trio.testing.MockClock
) -> None:
    data = payload(200_000)
    (www / "slow.tar").write_bytes(data)
    server = HttpServer(www)
    server.rate = 20_000  # 10 s for the whole file, never 1 s without a byte
    reports: list[tuple[float, Progress]] = []
    async with server.running():
        start = trio.current_time()
        await download(
            server.url("slow.tar"),
            dest,
            max_bytes=CAP,
            timeout=1.0,
            progress=lambda p: reports.append((trio.current_time(), p)),
        )
        assert trio.current_time() - start >= 9.5
    assert read(dest) == data
    # Progress at most every PROGRESS_INTERVAL, and the final one always.
    times = [t for t, _ in reports[:-1]]
    assert all(b - a >= PROGRESS_INTERVAL for a, b in itertools.pairwise(times))
    assert 10 <= len(reports) <= 10 / PROGRESS_INTERVAL + 2
    assert reports[-1][1] == Progress(len(data), len(data))


async def test_ftp_idle_timeout_on_a_silent_server(dest: Path) -> None:
    async with silent_server() as port:
        with pytest.raises(TransferError, match=r"no data for 0.5 s"):
            await download(f"ftp://127.0.0.1:{port}/image.tar", dest, max_bytes=CAP, timeout=0.5)


async def test_untrusted_certificate(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www, ca=trustme.CA())
    stranger = HttpServer(www, ca=trustme.CA())
    async with server.running():
        # The system's roots do not know trustme's CA; nor does another CA.
        for context in (None, stranger.client_ssl_context()):
            with pytest.raises(TransferError, match="certificate") as refused:
                await download(server.url("image.tar"), dest, max_bytes=CAP, ssl_context=context)
            assert "unable to get local issuer certificate" in refused.value.reason
    assert not exists(dest)


async def test_certificate_for_another_host_name(www: Path, dest: Path) -> None:
    (www / "image.tar").write_bytes(b"x")
    server = HttpServer(www, ca=trustme.CA(), hostnames=("firmware.example.org",))
    async with server.running():
        with pytest.raises(TransferError, match="certificate") as refused:
            await download(
                server.url("image.tar"),
                dest,
                max_bytes=CAP,
                ssl_context=server.client_ssl_context(),
            )
    assert "mismatch" in refused.value.reason or "match" in refused.value.reason


async def test_redirects_followed_up_to_five(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    for n in range(5):
        server.redirects[f"/r{n}"] = f"/r{n + 1}"
    server.redirects["/r5"] = "/image.tar"
    server.redirects["/loop"] = "/loop"
    async with server.running():
        assert await download(server.url("r1"), dest, max_bytes=CAP) == len(image)
        remove(dest)
        with pytest.raises(TransferError, match="redirect"):
            await download(server.url("r0"), dest, max_bytes=CAP)  # six
        with pytest.raises(TransferError, match="redirect"):
            await download(server.url("loop"), dest, max_bytes=CAP)
    assert not exists(dest)


async def test_https_redirect_to_http_is_refused(www: Path, image: bytes, dest: Path) -> None:
    plain = HttpServer(www)
    secure = HttpServer(www, ca=trustme.CA())
    async with plain.running(), secure.running():
        secure.redirects["/image.tar"] = plain.url("image.tar")
        with pytest.raises(TransferError, match="https to http"):
            await download(
                secure.url("image.tar"),
                dest,
                max_bytes=CAP,
                ssl_context=secure.client_ssl_context(),
            )
    assert plain.seen() == []


@pytest.mark.parametrize(
    "url",
    ["sftp://host/image.tar", "file:///etc/passwd", "image.tar", "tftp://10.0.0.1/x"],
)
async def test_unsupported_scheme(url: str, dest: Path) -> None:
    with pytest.raises(TransferError, match="unsupported scheme") as refused:
        await download(url, dest, max_bytes=CAP)
    assert not refused.value.retryable
    with pytest.raises(TransferError, match="unsupported scheme"):
        await upload(url, dest, timeout=1)


@pytest.mark.parametrize("url", ["http://host:port/x", "http:///x", "ftp://h:99999/x"])
async def test_malformed_url(url: str, dest: Path) -> None:
    with pytest.raises(TransferError, match="malformed URL") as refused:
        await download(url, dest, max_bytes=CAP)
    assert not refused.value.retryable


# --------------------------------------------------------------------------- FTP resume, cancel


async def _cancelled_ftp_part(
    ftp_root: Path, dest: Path, data: bytes, *, at_least: int
) -> tuple[int, int]:
    """Start a throttled FTP download, cancel it once ``at_least`` bytes arrived.

    Returns the server's port and the part's size right after the cancel.
    """
    (ftp_root / "image.tar").write_bytes(data)
    with FtpServer(ftp_root, rate=200_000) as slow:
        with trio.CancelScope() as scope:

            def cancel_when_enough(progress: Progress) -> None:
                if progress.done >= at_least:
                    scope.cancel()

            await download(slow.url("image.tar"), dest, max_bytes=CAP, progress=cancel_when_enough)
        assert scope.cancelled_caught
        size = size_of(part_of(dest))
        # The server still sends; a worker thread still writing would grow the
        # part now (200 kB/s). Long enough for several of its blocks.
        await trio.sleep(0.75)
        assert size_of(part_of(dest)) == size
        assert not exists(dest)
        return slow.port, size


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_cancelled_ftp_download_writes_nothing_afterwards_then_resumes(
    ftp_root: Path, dest: Path
) -> None:
    data = payload(2 * MB)
    port, size = await _cancelled_ftp_part(ftp_root, dest, data, at_least=100_000)
    assert 100_000 <= size < len(data)
    # The same URL (same port), now at full speed: REST from the part's size.
    with FtpServer(ftp_root, port=port) as fast:
        reports: list[Progress] = []
        assert await download(
            fast.url("image.tar"), dest, max_bytes=CAP, progress=reports.append
        ) == len(data)
        assert f"REST {size}" in fast.commands()
    assert read(dest) == data
    assert leftovers(dest) == []
    assert reports[0].done == size


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_ftp_server_without_rest_starts_over(ftp_root: Path, dest: Path) -> None:
    data = payload(MB)
    port, size = await _cancelled_ftp_part(ftp_root, dest, data, at_least=50_000)
    with FtpServer(ftp_root, port=port, rest=False) as no_rest:
        assert await download(no_rest.url("image.tar"), dest, max_bytes=CAP) == len(data)
        commands = no_rest.commands()
    assert f"REST {size}" in commands  # asked, refused with 502
    assert commands.count("RETR image.tar") == 1
    assert read(dest) == data


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_ftp_errors(ftp: FtpServer, ftp_root: Path, dest: Path) -> None:
    with pytest.raises(TransferError, match="550"):
        await download(ftp.url("missing.tar"), dest, max_bytes=CAP)
    wrong = ftp.url("x").replace(urllib.parse.quote(ftp.password, safe=""), "nope")
    with pytest.raises(TransferError, match="530"):
        await download(wrong, dest, max_bytes=CAP)
    with pytest.raises(TransferError, match="530"):
        await download(ftp.url("x", login=False), dest, max_bytes=CAP)  # no anonymous here
    with pytest.raises(TransferError, match="no file name") as refused:
        await download(ftp.url("dir/"), dest, max_bytes=CAP)
    assert not refused.value.retryable


# --------------------------------------------------------------------------- upload


@pytest.fixture
def diagnostics(tmp_path: Path) -> tuple[Path, bytes]:
    data = payload(700_000, seed=9)
    path = tmp_path / 'diag "2024".zip'
    path.write_bytes(data)
    return path, data


async def test_upload_http_put(www: Path, diagnostics: tuple[Path, bytes]) -> None:
    source, data = diagnostics
    reports: list[Progress] = []
    server = HttpServer(www)
    async with server.running():
        await upload(server.url("upload/diag.zip"), source, progress=reports.append)
    assert server.uploads == {"/upload/diag.zip": data}
    (put,) = server.seen("PUT")
    assert put.headers["content-length"] == str(len(data))
    assert reports[-1] == Progress(len(data), len(data))


async def test_upload_https_put(www: Path, diagnostics: tuple[Path, bytes]) -> None:
    source, data = diagnostics
    server = HttpServer(www, ca=trustme.CA())
    async with server.running():
        await upload(server.url("d.zip"), source, ssl_context=server.client_ssl_context())
    assert server.uploads == {"/d.zip": data}


async def test_upload_falls_back_to_post_on_405(www: Path, diagnostics: tuple[Path, bytes]) -> None:
    source, data = diagnostics
    server = HttpServer(www)
    server.put_status = 405
    async with server.running():
        await upload(server.url("upload"), source)
    assert [r.method for r in server.seen()] == ["PUT", "POST"]
    post = server.seen("POST")[0]
    assert post.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert post.headers["content-length"] == str(len(post.body))
    assert post.form == {"file": (source.name, data)}  # the quote in the name survives
    assert server.uploads == {"/upload": data}


async def test_upload_errors_name_the_status(www: Path, diagnostics: tuple[Path, bytes]) -> None:
    source, _ = diagnostics
    server = HttpServer(www)
    async with server.running():
        server.put_status = 403
        with pytest.raises(TransferError, match="HTTP 403 Forbidden to PUT"):
            await upload(server.url("u"), source)
        server.put_status, server.post_status = 405, 500
        with pytest.raises(TransferError, match="HTTP 500 Internal Server Error to POST"):
            await upload(server.url("u"), source)
    with pytest.raises(TransferError, match="cannot read"):
        await upload(server.url("u"), source.with_name("absent.zip"))


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_upload_ftp_with_a_password(
    ftp: FtpServer, ftp_root: Path, diagnostics: tuple[Path, bytes]
) -> None:
    source, data = diagnostics
    (ftp_root / "incoming").mkdir()
    reports: list[Progress] = []
    await upload(ftp.url("incoming/diag.zip"), source, progress=reports.append)
    assert (ftp_root / "incoming" / "diag.zip").read_bytes() == data
    commands = ftp.commands()
    assert "STOR diag.zip" in commands
    assert "PASV" in commands
    assert reports[-1] == Progress(len(data), len(data))


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_upload_ftp_anonymous(
    tmp_path: Path, ftp_root: Path, diagnostics: tuple[Path, bytes]
) -> None:
    source, data = diagnostics
    with FtpServer(ftp_root, anonymous=True) as server:
        await upload(server.url("diag.zip", login=False), source)
        assert server.commands()[0] == "USER anonymous"
    assert (ftp_root / "diag.zip").read_bytes() == data


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_upload_ftp_refused(
    ftp: FtpServer, ftp_root: Path, diagnostics: tuple[Path, bytes]
) -> None:
    source, _ = diagnostics
    with pytest.raises(TransferError, match="550"):
        await upload(ftp.url("no/such/dir/diag.zip"), source)


@pytest.mark.slow  # starts an FTP server process (pyftpdlib)
async def test_passwords_never_reach_the_log_or_the_errors(
    www: Path, ftp: FtpServer, diagnostics: tuple[Path, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    source, _ = diagnostics
    caplog.set_level(logging.DEBUG)
    secret = ftp.password
    errors: list[TransferError] = []
    wrong_dir = ftp.url("no/such/dir/diag.zip")
    with pytest.raises(TransferError) as failed:
        await upload(wrong_dir, source)
    errors.append(failed.value)
    server = HttpServer(www)
    async with server.running():
        quoted = urllib.parse.quote(secret, safe="")
        with pytest.raises(TransferError) as failed:
            await download(
                server.url("missing").replace("://", f"://cp:{quoted}@"),
                source.with_name("never.tar"),
                max_bytes=CAP,
            )
        errors.append(failed.value)
        # httpx sends the URL's credentials as Basic auth.
        assert server.seen()[0].headers["authorization"].startswith("Basic ")
    text = "\n".join([r.getMessage() for r in caplog.records] + [str(e) for e in errors])
    assert caplog.records  # something was logged
    assert secret not in text
    assert urllib.parse.quote(secret, safe="") not in text
    assert "***" in errors[0].url


async def test_upload_idle_timeout_on_a_silent_server(diagnostics: tuple[Path, bytes]) -> None:
    source, _ = diagnostics  # 700 kB: more than the socket buffers take unread
    async with silent_server() as port:
        with pytest.raises(TransferError, match=r"no data for 0.5 s"):
            await upload(f"http://127.0.0.1:{port}/diag.zip", source, timeout=0.5)
        with pytest.raises(TransferError, match=r"no data for 0.5 s"):
            await upload(f"ftp://127.0.0.1:{port}/diag.zip", source, timeout=0.5)


# --------------------------------------------------------------------------- redact and helpers


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("ftp://user:pass@host/diag/x.zip", "ftp://user:***@host/diag/x.zip"),
        ("ftp://user:p%40ss@host:2121/x", "ftp://user:***@host:2121/x"),
        ("ftp://us%3Aer:a:b@c@[::1]:21/x", "ftp://us%3Aer:***@[::1]:21/x"),
        ("ftp://anonymous@host/x", "ftp://anonymous@host/x"),
        ("https://host/fw.tar?v=2", "https://host/fw.tar?v=2"),
        (
            "https://b.s3.example/x?X-Amz-Signature=abc&X-Amz-Credential=k&part=1",
            "https://b.s3.example/x?X-Amz-Signature=***&X-Amz-Credential=***&part=1",
        ),
        ("http://[::1/broken:secret@x", "http://[::1/broken:secret@x"),
        ("ftp://u:pw@[::1/x", "ftp://u:***@[::1/x"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_parse_multipart_is_byte_exact() -> None:
    content = b"\r\n--not-the-boundary\r\n\x00\xff\r\n"
    body = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a\\"b"\r\n\r\n'
        + content
        + b"\r\n--B--\r\n"
    )
    assert parse_multipart("multipart/form-data; boundary=B", body) == {"file": ('a"b', content)}


async def test_http_server_in_a_thread(www: Path, image: bytes, dest: Path) -> None:
    server = HttpServer(www)
    with server.in_thread():
        assert await download(server.url("image.tar"), dest, max_bytes=CAP) == len(image)
    assert read(dest) == image
