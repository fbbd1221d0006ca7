"""Start a Flower SuperLink and N SuperNodes on 127.0.0.1, run this project's app, stop them.

Every process started here is stopped by PID (its whole process group), also on failure.
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


class LocalFederation:
    """``with LocalFederation(tmp, 4) as fed: fed.run({...})``: one SuperLink, N SuperNodes."""

    def __init__(self, workdir: Path, num_nodes: int, data_dir: str | None = None) -> None:
        self.dir = Path(workdir)
        self.n = num_nodes
        self.data_dir = data_dir
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
        (home / "config.toml").write_text(
            f'[superlink.local-test]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            self._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host",
                        "127.0.0.1", "--port", str(self.port), "--database",
                        str(self.dir / "state.db")])  # fmt: skip
            for i in range(self.n):
                node_config = f"partition-id={i} num-partitions={self.n}"
                if self.data_dir:
                    node_config += f' data-dir="{self.data_dir}"'
                self._start(f"supernode{i}", [str(BIN / "flower-supernode"), "--insecure",
                            "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                            "--node-config", node_config])  # fmt: skip
        except BaseException:
            self.stop()
            raise
        return self

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
