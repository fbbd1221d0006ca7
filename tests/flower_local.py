"""Start a Flower SuperLink and N SuperNodes on 127.0.0.1, run this project's app, stop them.

Every process started here is stopped by PID (its whole process group), also on failure. With
``tls=True`` every connection is TLS (a CA and a server certificate for 127.0.0.1 made here with
the ``cryptography`` package) and the SuperLink authenticates SuperNodes: each node gets an ECDSA
key pair, and only the nodes in ``registered`` are added to the federation (``flwr supernode
register``) before they start; the others are refused.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # flwr starts its helpers by name
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")  # fmt: skip
    return env


def make_certificates(folder: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate it signed for 127.0.0.1 / localhost (PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedlease test CA"))
          .issuer_name(name("fedlease test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP384R1())
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), loopback])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA (P-384) key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))  # fmt: skip
    ssh = serialization.Encoding.OpenSSH
    public.write_bytes(key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH))
    return private, public


class LocalFederation:
    """``with LocalFederation(tmp, 4) as fed: fed.run({...})``: one SuperLink, N SuperNodes."""

    def __init__(self, workdir: Path, num_nodes: int, data_dir: str | None = None,
                 tls: bool = False, registered: set[int] | None = None) -> None:  # fmt: skip
        self.dir = Path(workdir)
        self.n = num_nodes
        self.data_dir = data_dir
        self.tls = tls
        self.registered = set(range(num_nodes)) if registered is None else set(registered)
        self.procs: list[subprocess.Popen] = []
        self.env = flower_env(self.dir / "flwr-home")
        self.port = free_port()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.dir, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalFederation:
        self.dir.mkdir(parents=True, exist_ok=True)
        home = self.dir / "flwr-home"
        home.mkdir(exist_ok=True)
        link = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.dir / "state.db")]  # fmt: skip
        node = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        if self.tls:
            certs = make_certificates(self.dir / "certificates")
            (home / "config.toml").write_text(
                f'[superlink.local-test]\naddress = "127.0.0.1:{self.port}"\n'
                f'root-certificates = "{certs["ca"]}"\n'
            )
            link += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                     "--ssl-keyfile", str(certs["key"]), "--enable-supernode-auth"]  # fmt: skip
            node += ["--root-certificates", str(certs["ca"])]
        else:
            (home / "config.toml").write_text(
                f'[superlink.local-test]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
            )
            link.append("--insecure")
            node.append("--insecure")
        try:
            self._start("superlink", link)
            keys = {}
            if self.tls:
                for i in range(self.n):
                    keys[i] = make_node_key(self.dir / "certificates", f"node{i}")
                for i in sorted(self.registered):
                    self.register(keys[i][1])
            for i in range(self.n):
                node_config = f"partition-id={i} num-partitions={self.n}"
                if self.data_dir:
                    node_config += f' data-dir="{self.data_dir}"'
                auth = ["--auth-supernode-private-key", str(keys[i][0])] if self.tls else []
                self._start(f"supernode{i}", [*node, *auth, "--port", str(free_port()),
                            "--node-config", node_config])  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

    def register(self, public_key: Path, timeout: float = 60) -> None:
        """``flwr supernode register`` the key, retried until the SuperLink answers."""
        deadline = time.time() + timeout
        while True:
            done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key),
                                   "local-test"], env=self.env, cwd=self.dir, capture_output=True,
                                  text=True, timeout=60)  # fmt: skip
            if done.returncode == 0:
                return
            if time.time() > deadline:
                raise RuntimeError(f"could not register {public_key}: {done.stdout}{done.stderr}")
            time.sleep(1.0)

    def start_run(self, run_config: dict) -> subprocess.Popen:
        """``flwr run`` this project with ``run_config`` overrides (values without spaces)."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        args = [str(BIN / "flwr"), "run", str(ROOT), "local-test", "--stream",
                "--run-config", items]  # fmt: skip
        return self._start("flwr-run", args)

    def run(self, run_config: dict, timeout: float) -> tuple[int, str]:
        """Start a run and wait for it: ``(exit code, its output)``."""
        return self.wait(self.start_run(run_config), timeout)

    def wait(self, run: subprocess.Popen, timeout: float) -> tuple[int, str]:
        """``(exit code, output)`` of a started run; ``flwr run --stream`` exits 0 even when the
        ServerApp failed, so a failure reported in its output counts as exit code 1."""
        rc = run.wait(timeout=timeout)
        log = self.log("flwr-run")
        if rc == 0 and "ServerApp raised an exception" in log:
            rc = 1
        return rc, log

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text()

    def kill_serverapp(self) -> list[int]:
        """SIGKILL this federation's ServerApp processes (``flwr-serverapp``, started by the
        SuperLink's SuperExec, connected to this SuperLink's port); their PIDs."""
        table = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True,
                               text=True).stdout.splitlines()  # fmt: skip
        killed = []
        for line in table:
            pid, args = line.split(None, 1)
            if "flwr-serverapp" in args and f"127.0.0.1:{self.port}" in args:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
        return killed

    def kill_node(self, i: int) -> None:
        """Stop SuperNode ``i`` (and its ClientApp processes) abruptly."""
        _kill_group(self.procs[1 + i], signal.SIGKILL)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _kill_group(proc, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            _kill_group(proc, signal.SIGKILL)
            proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace('"', '\\"') + '"'
