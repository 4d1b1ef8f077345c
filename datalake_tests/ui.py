"""Process helpers for the UI tests: ``dagster dev``, a GraphQL client, headless Chromium.

* :func:`start_dagster_dev` runs ``dagster dev`` (webserver + daemon + code server) on a free
  loopback port, in a session of its own, and waits until the code location has loaded;
  :meth:`DagsterDev.stop` signals the whole process group (SIGTERM, wait, SIGKILL) and then
  checks by PID that no member of the session (webserver, daemon, code server, run worker)
  survived.
* :meth:`DagsterDev.graphql` talks to ``/graphql``, the API the UI itself uses.
* :func:`run_chromium` runs Debian's ``chromium`` headless (``--screenshot`` / ``--dump-dom``)
  with every background-networking feature off, stopped the same way;
  :func:`png_stats` decodes the screenshot with the standard library to prove it is not blank.

Nothing here imports pytest. The generic process machinery (``free_port``, ``ServiceStartError``)
comes from ``services.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from datalake_tests.services import LOOPBACK, REPO_ROOT, ServiceStartError, free_port

_T = TypeVar("_T")
_LOG_TAIL_CHARS = 8000

# Debian's package installs a launcher script here (it execs /usr/lib/chromium/chromium).
CHROMIUM_BIN = Path("/usr/bin/chromium")
CHROMIUM_INSTALL_HINT = "run `bash scripts/install-test-deps.sh` as root (apt `chromium`)"


def _tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


# ---------------------------------------------------------------- process sessions


@dataclass(frozen=True)
class ProcInfo:
    """A process seen at some moment; ``create_time`` tells it apart from a later PID reuse."""

    pid: int
    create_time: float
    cmdline: str

    def is_alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            # Same PID *and* same start time: still the process we saw, not a reuse.
            return proc.create_time() == self.create_time and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            return True


def _info(proc: psutil.Process) -> ProcInfo | None:
    try:
        with proc.oneshot():
            return ProcInfo(proc.pid, proc.create_time(), " ".join(proc.cmdline())[:300])
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return ProcInfo(proc.pid, 0.0, "<access denied>")


def session_members(sid: int) -> list[ProcInfo]:
    """Every live process of session ``sid`` (found by scanning /proc), plus the descendants of ``sid``.

    A child reparented to init keeps its session id, so the scan also finds what the process
    tree no longer shows; the descendants catch anything that called ``setsid`` itself.
    """
    found: dict[int, ProcInfo] = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) != sid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
        info = _info(proc)
        if info is not None:
            found[info.pid] = info
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(sid).children(recursive=True):
            info = _info(child)
            if info is not None:
                found.setdefault(info.pid, info)
    return sorted(found.values(), key=lambda p: p.pid)


@dataclass
class StopReport:
    """What stopping a session took: who was in it, and whether SIGKILL was needed."""

    members: list[ProcInfo]
    graceful: bool
    seconds: float


def stop_session(
    process: subprocess.Popen[bytes],
    *,
    known: list[ProcInfo] | None = None,
    term_timeout: float = 30.0,
    kill_timeout: float = 10.0,
) -> StopReport:
    """Stop the session led by ``process`` (started with ``start_new_session=True``) by PID.

    SIGTERM goes to the process group, then we wait for every member (those in ``known``, seen
    earlier, and those in the session now); survivors get SIGKILL, to the group and one by one.
    A member that appears meanwhile (a shutting-down parent spawning a child) gets the same in a
    further round. Raises if anything of the session is still alive at the end. Signals only ever go to the
    group we created or to PIDs whose start time still matches what we recorded.
    """
    started = time.monotonic()
    sid = process.pid
    members = {p.pid: p for p in [*(known or []), *session_members(sid)]}
    leader_alive = process.poll() is None

    def alive() -> list[ProcInfo]:
        process.poll()  # reap the leader, so it does not linger as a zombie
        return [p for p in members.values() if p.is_alive()]

    def signal_group(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(sid, sig)

    def signal_each(processes: list[ProcInfo], sig: signal.Signals) -> None:
        for proc in processes:
            if proc.is_alive():  # still the process we saw, not a PID reuse
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, sig)

    def late() -> list[ProcInfo]:
        """Members that appeared after the signals (a dying parent may still spawn a child)."""
        return [p for p in session_members(sid) if p.pid not in members]

    graceful = True
    rounds = 0
    while (leader_alive or alive()) and rounds < 3:
        rounds += 1
        signal_group(signal.SIGTERM)
        if rounds > 1:  # late members may sit in a process group of their own
            signal_each(alive(), signal.SIGTERM)
        deadline = time.monotonic() + term_timeout
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = alive()
        if survivors:
            graceful = False
            signal_group(signal.SIGKILL)
            signal_each(survivors, signal.SIGKILL)
            deadline = time.monotonic() + kill_timeout
            while alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        leader_alive = False
        members.update((p.pid, p) for p in late())  # stopped the same way in the next round
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=kill_timeout)
    left = [*alive(), *late()]
    if left:
        raise RuntimeError(
            f"session {sid} not empty after SIGTERM+SIGKILL: "
            + "; ".join(f"{p.pid} {p.cmdline}" for p in left)
        )
    return StopReport(
        members=sorted(members.values(), key=lambda p: p.pid),
        graceful=graceful,
        seconds=time.monotonic() - started,
    )


def _session_prefix() -> list[str]:
    """Command prefix making the child a well-behaved, stoppable member of its own session.

    * ``setpriv --pdeathsig TERM`` (exec, so the PID stays the child's): it is stopped even if the
      test process dies without running its finalizers (bound to the starting *thread*);
    * ``env --default-signal=INT,TERM`` (exec too): a process started from a non-interactive
      shell's background job inherits SIGINT *ignored*; ``dagster dev`` maps SIGTERM onto its
      SIGINT handler, so it would then ignore SIGTERM as well.
    """
    prefix: list[str] = []
    setpriv = shutil.which("setpriv", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/bin"]))
    if setpriv is not None:
        prefix += [setpriv, "--pdeathsig", "TERM", "--"]
    env_bin = shutil.which("env", path=os.pathsep.join(["/usr/bin", "/bin", os.environ.get("PATH", "")]))
    if env_bin is not None and _env_supports_default_signal(env_bin):
        prefix += [env_bin, "--default-signal=INT,TERM"]
    return prefix


def _env_supports_default_signal(env_bin: str) -> bool:
    result = subprocess.run(
        [env_bin, "--default-signal=INT", "true"], capture_output=True, timeout=10, check=False
    )
    return result.returncode == 0


# ---------------------------------------------------------------- dagster dev


class GraphQLError(RuntimeError):
    """The webserver answered with GraphQL ``errors`` (or not with JSON at all)."""


@dataclass(kw_only=True)
class DagsterDev:
    """A running ``dagster dev`` (webserver, daemon and code server) started by this module."""

    process: subprocess.Popen[bytes] = field(repr=False)
    port: int
    host: str = LOOPBACK
    dagster_home: Path
    log_path: Path
    startup_seconds: float = 0.0
    # Webserver, daemon and code server as seen once the location had loaded.
    members: list[ProcInfo] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        return _tail(self.log_path, chars)

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, *, timeout: float = 60) -> Any:
        """POST ``query`` to ``/graphql``; returns ``data``, raises :class:`GraphQLError` on ``errors``."""
        return graphql_request(self.url("/graphql"), query, variables, timeout=timeout)

    def stop(self) -> StopReport:
        return stop_session(self.process, known=self.members)


# Loopback only: never through an HTTP(S)_PROXY the environment may set.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def graphql_request(
    url: str, query: str, variables: Mapping[str, Any] | None = None, *, timeout: float = 60
) -> Any:
    body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", "Accept": "application/json"}
    )
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        # GraphQL validation errors come back as HTTP 400 with a JSON body naming the problem.
        detail = exc.read().decode(errors="replace")[:4000]
        raise GraphQLError(f"HTTP {exc.code} from {url}: {detail}") from exc
    if payload.get("errors"):
        raise GraphQLError(json.dumps(payload["errors"], indent=1)[:4000])
    return payload["data"]


WORKSPACE_QUERY = """
query UiTestWorkspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


class CodeLocationLoadError(ServiceStartError):
    """``dagster dev`` is up but the code location failed to load (a PythonError in the workspace)."""


def _location_loaded(dev: DagsterDev, location: str) -> None:
    """Raises until ``location`` is LOADED; raises :class:`CodeLocationLoadError` if it failed."""
    _DIRECT.open(dev.url("/server_info"), timeout=5).close()
    data = dev.graphql(WORKSPACE_QUERY, timeout=30)["workspaceOrError"]
    if data["__typename"] != "Workspace":
        raise RuntimeError(f"workspace: {data}")
    entries = {entry["name"]: entry for entry in data["locationEntries"]}
    entry = entries.get(location)
    if entry is None:
        raise RuntimeError(f"location {location!r} not in the workspace yet ({sorted(entries)})")
    loaded = entry["locationOrLoadError"]
    if entry["loadStatus"] != "LOADED" or loaded is None:
        raise RuntimeError(f"location {location!r}: {entry['loadStatus']}")
    if loaded["__typename"] == "PythonError":
        raise CodeLocationLoadError(
            f"code location {location!r} failed to load:\n{loaded['message']}\n{''.join(loaded['stack'])[-3000:]}"
        )


def start_dagster_dev(
    *,
    env: Mapping[str, str],
    dagster_home: Path,
    log_path: Path,
    instance_yaml: Path = REPO_ROOT / "deploy" / "dagster.local.yaml",
    workspace: Path = REPO_ROOT / "workspace.yaml",
    cwd: Path = REPO_ROOT,
    location: str = "datalake",
    timeout: float = 180.0,
) -> DagsterDev:
    """``dagster dev -w workspace -h 127.0.0.1 -p <free port>`` with a fresh ``DAGSTER_HOME``.

    ``instance_yaml`` is copied to ``dagster_home/dagster.yaml``. ``env`` is the complete
    environment of the process (``DAGSTER_HOME`` is set here). Returns once ``location`` has
    loaded; if it fails to load, the process exits, or ``timeout`` passes, everything started
    is stopped and :class:`ServiceStartError` carries the log.
    """
    dagster_bin = Path(sys.executable).parent / "dagster"
    if not dagster_bin.exists():
        raise ServiceStartError(f"{dagster_bin} missing: run `uv sync --frozen`")
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(instance_yaml, dagster_home / "dagster.yaml")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**env, "DAGSTER_HOME": str(dagster_home), "PYTHONUNBUFFERED": "1"}

    last_problem = ""
    for _attempt in range(2):  # a second port if another process took the first one in the gap
        port = free_port()
        argv = [str(dagster_bin), "dev", "-w", str(workspace), "-h", LOOPBACK, "-p", str(port)]
        started = time.monotonic()
        with log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                [*_session_prefix(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=full_env,
                start_new_session=True,
            )
        dev = DagsterDev(process=process, port=port, dagster_home=dagster_home, log_path=log_path)
        try:
            wait_for(
                lambda dev=dev: _location_loaded(dev, location),
                timeout=timeout,
                what=f"dagster dev on port {port}",
                alive=dev.is_running,
                fatal=(CodeLocationLoadError,),
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                stop_session(process)
            log_text = _tail(log_path)
            last_problem = f"{exc}\n--- {log_path} ---\n{log_text}"
            if "address already in use" in log_text.lower() and not isinstance(exc, CodeLocationLoadError):
                continue
            if isinstance(exc, CodeLocationLoadError):
                raise CodeLocationLoadError(last_problem) from None
            if isinstance(exc, Exception):
                raise ServiceStartError(last_problem) from None
            raise
        dev.startup_seconds = time.monotonic() - started
        dev.members = session_members(process.pid)
        return dev
    raise ServiceStartError(last_problem)


def wait_for(
    check: Callable[[], _T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.5,
    alive: Callable[[], bool] | None = None,
    fatal: tuple[type[BaseException], ...] = (),
) -> _T:
    """Call ``check`` until it returns without raising; its value is returned.

    Raises ``TimeoutError`` (with the last error) after ``timeout`` s, a ``fatal`` exception at
    once, and ``RuntimeError`` if ``alive`` says the process being waited on is gone.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited (last error: {last!r})")
        try:
            return check()
        except fatal:
            raise
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s (last: {last})")
        time.sleep(interval)


# ---------------------------------------------------------------- headless Chromium


def find_chromium() -> Path | None:
    """Debian's ``/usr/bin/chromium``, or a ``chromium`` on PATH; None when not installed."""
    if CHROMIUM_BIN.is_file() and os.access(CHROMIUM_BIN, os.X_OK):
        return CHROMIUM_BIN
    found = shutil.which("chromium")
    return Path(found) if found else None


# Headless, offline: no GPU, no sandbox (root in containers), and nothing that phones home —
# this machine's network refuses Google's endpoints, and a test must stay on loopback anyway.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-proxy-server",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    "--password-store=basic",
    "--use-mock-keychain",
)


@dataclass
class ChromiumResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    stop: StopReport


def run_chromium(
    url: str,
    *,
    user_data_dir: Path,
    screenshot: Path | None = None,
    dump_dom: bool = False,
    window_size: tuple[int, int] = (1400, 900),
    virtual_time_budget_ms: int = 15_000,
    timeout: float = 120.0,
    chromium: Path | None = None,
) -> ChromiumResult:
    """Load ``url`` in headless Chromium; write a PNG to ``screenshot`` and/or return the DOM.

    Chromium runs in a session of its own and is stopped (with its zygote, GPU and renderer
    processes) by process group when it exits or times out; raises ``TimeoutError`` then.
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"chromium not found; {CHROMIUM_INSTALL_HINT}")
    user_data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(binary),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--virtual-time-budget={virtual_time_budget_ms}",
    ]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.unlink(missing_ok=True)
        argv.append(f"--screenshot={screenshot}")
    if dump_dom:
        argv.append("--dump-dom")
    argv.append(url)
    env = {**os.environ, "HOME": str(user_data_dir)}  # keeps ~/.config, ~/.cache writes out of $HOME
    started = time.monotonic()
    process = subprocess.Popen(
        [*_session_prefix(), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        out, err = b"", b""
    finally:
        report = stop_session(process, term_timeout=10.0)
    if timed_out:
        raise TimeoutError(f"chromium did not finish {url} within {timeout:.0f} s")
    return ChromiumResult(
        argv=argv,
        returncode=process.returncode,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        seconds=time.monotonic() - started,
        stop=report,
    )


# ---------------------------------------------------------------- PNG check (stdlib only)


@dataclass(frozen=True)
class PngStats:
    width: int
    height: int
    # Over a sample grid of pixels: how many distinct colours, and the share of the commonest.
    distinct_colours: int
    dominant_share: float


def png_stats(path: Path, *, sample_step: int = 4) -> PngStats:
    """Decode an 8-bit, non-interlaced RGB/RGBA/grey PNG (what Chromium writes) with zlib alone."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos = 8
    idat = bytearray()
    width = height = bit_depth = colour_type = interlace = -1
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour_type)
    if bit_depth != 8 or channels is None or interlace != 0:
        raise ValueError(f"{path}: unsupported PNG (depth {bit_depth}, colour type {colour_type})")
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    previous = bytearray(stride)
    colours: Counter[bytes] = Counter()
    offset = 0
    for y in range(height):
        kind = raw[offset]
        line = bytearray(raw[offset + 1 : offset + 1 + stride])
        offset += 1 + stride
        _unfilter(kind, line, previous, channels)
        if y % sample_step == 0:
            for x in range(0, stride, channels * sample_step):
                colours[bytes(line[x : x + channels])] += 1
        previous = line
    total = sum(colours.values())
    return PngStats(
        width=width,
        height=height,
        distinct_colours=len(colours),
        dominant_share=colours.most_common(1)[0][1] / total if total else 1.0,
    )


def _unfilter(kind: int, line: bytearray, prior: bytearray, bpp: int) -> None:
    n = len(line)
    if kind == 0:
        return
    if kind == 1:  # Sub
        for i in range(bpp, n):
            line[i] = (line[i] + line[i - bpp]) & 0xFF
    elif kind == 2:  # Up
        for i in range(n):
            line[i] = (line[i] + prior[i]) & 0xFF
    elif kind == 3:  # Average
        for i in range(n):
            left = line[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + ((left + prior[i]) >> 1)) & 0xFF
    elif kind == 4:  # Paeth
        for i in range(n):
            a = line[i - bpp] if i >= bpp else 0
            b = prior[i]
            c = prior[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            line[i] = (line[i] + predictor) & 0xFF
    else:
        raise ValueError(f"bad PNG filter type {kind}")
