"""A whole Flower federation on this machine, on loopback: for tests and trials.

:class:`LoopbackFederation` starts a SuperLink and one SuperNode per rows
file as separate processes (``--insecure``, 127.0.0.1 only, free ports,
one ``FLWR_HOME`` each), runs an app with ``flwr run``, and stops every
process it started by its PID (each in its own process group, so that
Flower's SuperExec and ClientApp children stop too), also when an error
interrupts it. It is no deployment: see the "Deploying on Flower" page for
TLS and node authentication.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

__all__ = ["LoopbackFederation"]

#: Seconds between two task polls of Flower's SuperExec (default 1 s).
TASK_POLL_INTERVAL = "0.05"


def free_port():
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A process in its own process group, writing to a log file.

    Parameters
    ----------
    cmd : list of str
    log : path-like
    env : dict
    """

    def __init__(self, cmd, log, env):
        self.log = str(log)
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.pid = self.proc.pid

    def text(self):
        """The log so far."""
        with open(self.log) as f:
            return f.read()

    def wait_for(self, pattern, timeout):
        """Wait until ``pattern`` appears in the log; its match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(
            f"{pattern!r} not in {self.log} after {timeout} s:\n{self.text()[-3000:]}"
        )

    def stop(self, sig=signal.SIGTERM, grace=3.0):
        """Stop the process group (by this process's PID); SIGKILL after ``grace`` s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        else:
            try:  # children a finished leader left behind
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._file.closed:
            self._file.close()


class LoopbackFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, as separate processes.

    Parameters
    ----------
    workdir : path-like
        Logs, ``FLWR_HOME`` directories and run files go here.
    row_files : list of path-like
        One ``.npy`` file per SuperNode, given to it as the node
        configuration ``data-path`` (what ``examples/flower_app`` reads).
    timeout : float, default=90.0
        Seconds to wait for the SuperLink and each SuperNode to be up.

    Attributes
    ----------
    node_ids : list of int
        The SuperNodes' ids, in the order of ``row_files``.
    nodes : list of Process
    processes : list of Process
        Every process started (stopped by :meth:`stop`).

    Examples
    --------
    ::

        with LoopbackFederation("/tmp/fed", ["a.npy", "b.npy"]) as fed:
            est, report = fed.run("examples/flower_app", {
                "estimator": "skfedmm.FederatedDictionaryLearning",
                "params": '{"n_components": 4, "max_iter": 3}'})
    """

    def __init__(self, workdir, row_files, timeout=90.0):
        self.workdir = os.path.abspath(workdir)
        self.row_files = [os.path.abspath(f) for f in row_files]
        self.timeout = timeout
        self.processes = []
        self.nodes = []
        self.node_ids = []
        self._bin = os.path.dirname(sys.executable)
        # Flower's SuperLink and SuperNodes start `flower-superexec` by name
        self._env = dict(
            os.environ, PATH=self._bin + os.pathsep + os.environ.get("PATH", ""),
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL=TASK_POLL_INTERVAL,
        )

    def _home(self, name):
        path = os.path.join(self.workdir, name)
        os.makedirs(path, exist_ok=True)
        return dict(self._env, FLWR_HOME=path)

    def _start(self, cmd, name, env):
        proc = Process(cmd, os.path.join(self.workdir, f"{name}.log"), env)
        self.processes.append(proc)
        return proc

    def start(self):
        """Start the SuperLink and the SuperNodes; wait until they are up."""
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        try:
            link = self._start(
                [os.path.join(self._bin, "flower-superlink"), "--insecure",
                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                "superlink", self._home("superlink"),
            )
            for k, path in enumerate(self.row_files):
                self.nodes.append(self._start(
                    [os.path.join(self._bin, "flower-supernode"), "--insecure",
                     "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                     "--node-config", f"data-path={json.dumps(path)}"],
                    f"supernode{k}", self._home(f"supernode{k}"),
                ))
            link.wait_for(r"Uvicorn running", self.timeout)
            self.node_ids = [
                int(p.wait_for(r"SuperNode ID: (\d+)", self.timeout).group(1)) for p in self.nodes
            ]
            cli = self._home("cli")
            with open(os.path.join(cli["FLWR_HOME"], "config.toml"), "w") as f:
                f.write(
                    '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                    f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
                )
            self._cli_env = cli
        except BaseException:
            self.stop()
            raise
        return self

    def submit(self, app, name, run_config):
        """Start ``flwr run`` of ``app`` with ``run_config`` (a dict); its process.

        ``output`` and ``report`` default to ``<workdir>/<name>.joblib`` and
        ``.json``; ``min-nodes`` to the number of SuperNodes.
        """
        config = {
            "output": os.path.join(self.workdir, f"{name}.joblib"),
            "report": os.path.join(self.workdir, f"{name}.json"),
            "min-nodes": len(self.nodes), "poll-interval": 0.05, **run_config,
        }
        path = os.path.join(self.workdir, f"{name}.toml")
        with open(path, "w") as f:
            f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        return self._start(
            [os.path.join(self._bin, "flwr"), "run", os.path.abspath(app), "local", "--stream",
             "--run-config", path],
            f"run-{name}", self._cli_env,
        )

    def result(self, proc, name, timeout=300.0):
        """Wait for a submitted run; the fitted estimator and the transport's report."""
        import joblib

        try:
            proc.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.stop()
            raise RuntimeError(f"flwr run {name} did not finish in {timeout} s:\n"
                               f"{proc.text()[-3000:]}") from None
        output = os.path.join(self.workdir, f"{name}.joblib")
        if not os.path.exists(output):
            raise RuntimeError(f"flwr run {name} saved no estimator:\n{proc.text()[-3000:]}")
        with open(os.path.join(self.workdir, f"{name}.json")) as f:
            report = json.load(f)
        return joblib.load(output), report

    def run(self, app, run_config, name="run", timeout=300.0):
        """Run ``app`` to the end; the fitted estimator and the report."""
        return self.result(self.submit(app, name, run_config), name, timeout)

    def stop(self):
        """Stop every process started, by PID, last started first."""
        for proc in reversed(self.processes):
            proc.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
