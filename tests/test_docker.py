"""docker/: no Docker engine runs on these machines, so the images are checked in two ways.

* Their invariants, read with real parsers (dockerfile-parse, PyYAML): pinned base images, the
  CuPy extra matching the CUDA base image and pyproject, entrypoint, non-root user, volumes,
  the compose GPU reservation, the build context that .dockerignore leaves.
* The CPU image's install steps, for real: the `pip`/`venv` RUN lines of docker/Dockerfile.cpu,
  taken from the parsed file, run in a fresh virtual environment from a build context copied
  with .dockerignore's rules; then `xpconv --version`, `xpconv info` and a one-epoch
  `xpconv train` on the bundled digits.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

yaml = pytest.importorskip("yaml", reason="pip install '.[test]' (pyyaml)")
dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="pip install '.[test]' (dockerfile-parse)")

from xpconv import __version__  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
# A CUDA 12 build, as docker/Dockerfile.cuda's header tells owners of a CUDA 12 driver to do.
CUDA12_ARGS = {"CUDA_VERSION": "12.2.2", "UBUNTU": "22.04"}


# --------------------------------------------------------------------------- parsing helpers


def load(path: Path, build_args: dict | None = None):
    # fileobj: given a path, dockerfile-parse only reads files named exactly "Dockerfile"
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), build_args=build_args or {})


def parse(which: str, build_args: dict | None = None):
    return load(DOCKERFILES[which], build_args)


def stages(dfp) -> list[list[dict]]:
    """The instructions of each build stage (a stage starts at its FROM)."""
    out: list[list[dict]] = []
    for ins in dfp.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out and ins["instruction"] != "COMMENT":
            out[-1].append(ins)
    return out


def instructions(stage, name):
    return [ins["value"] for ins in stage if ins["instruction"] == name]


def env_pairs(value: str) -> list[tuple[str, str]]:
    """`ENV A=1 B=$A/x` -> [("A", "1"), ("B", "$A/x")] (the key=value form)."""
    pairs = []
    for token in shlex.split(value):
        key, sep, val = token.partition("=")
        assert sep, f"ENV {value!r}: use the KEY=value form"
        pairs.append((key, val))
    return pairs


def final_env(stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in instructions(stage, "ENV"):
        env.update(env_pairs(value))
    return env


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pip_install_args(run_line: str, env: dict[str, str]) -> list[str]:
    """Evaluate a RUN line with bash, `pip`/`python`/`ls`/`rm` stubbed, and return the arguments
    its `pip install` received: the line's own quoting and ${VAR%%.*} expansions decide."""
    stubs = (
        'pip() { printf "%s\\n" "$@"; }; python() { :; }; python3() { :; }; rm() { :; }; '
        "ls() { echo /wheels/xpconv-0.0.0-py3-none-any.whl; }; "
    )
    out = subprocess.run(
        ["bash", "-c", stubs + run_line], env={**env, "PATH": os.environ["PATH"]},
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out and out[0] == "install", f"expected a `pip install` in {run_line!r}, got {out}"
    return [a for a in out[1:] if not a.startswith("-")]


def install_line(stage) -> str:
    lines = [v for v in instructions(stage, "RUN") if re.search(r"\bpip install\b", v)]
    assert len(lines) == 1, f"expected one `pip install` RUN line in the final stage, got {lines}"
    return lines[0]


# --------------------------------------------------------------------------- static invariants


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_base_images_are_pinned(which):
    dfp = parse(which)
    aliases = {v.split()[-1].lower() for v in instructions(dfp.structure, "FROM") if " as " in v.lower()}
    for image in dfp.parent_images:
        if image.lower() in aliases:
            continue
        name, _, tag = image.partition(":")
        assert tag, f"{which}: FROM {image} has no tag"
        assert "latest" not in tag, f"{which}: FROM {image} is not pinned"
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{which}: FROM {image}: pin an exact version (X.Y.Z-...)"


@pytest.mark.parametrize("build_args", [None, CUDA12_ARGS], ids=["default", "cuda12"])
def test_cuda_extra_matches_the_base_image_and_pyproject(build_args):
    dfp = parse("cuda", build_args)
    base = dfp.parent_images[-1]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base)
    assert m, f"the runtime stage should be an official nvidia/cuda runtime image, got {base}"
    major = m.group(1)
    final = stages(dfp)[-1]
    args = {k: v for k, _, v in (a.partition("=") for a in instructions(dfp.structure, "ARG")) if v}
    args.update(build_args or {})
    installed = pip_install_args(install_line(final), args)
    assert len(installed) == 1 and installed[0].startswith("/wheels/xpconv-"), installed
    extras = re.fullmatch(r".*\.whl\[([\w,]+)\]", installed[0]).group(1).split(",")
    cuda = [e for e in extras if e.startswith("cuda")]
    assert cuda == [f"cuda{major}"], f"base image {base} is CUDA {major} but the image installs xpconv[{','.join(extras)}]"
    assert "mpi" in extras, f"the image should install the mpi extra for mpiexec runs, got xpconv[{','.join(extras)}]"
    extra = cuda[0]
    requirements = pyproject()["project"]["optional-dependencies"][extra]
    assert any(re.match(rf"cupy-cuda{major}x\b", r) for r in requirements), requirements


def test_cpu_image_installs_no_cuda():
    dfp = parse("cpu")
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", dfp.parent_images[-1]), dfp.parent_images
    installed = pip_install_args(install_line(stages(dfp)[-1]), {})
    # mpi for mpiexec runs, numba for the compiled 3x3 convolutions; no cupy
    assert installed == ["/wheels/xpconv-0.0.0-py3-none-any.whl[mpi,numba]"], installed


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_entrypoint_user_workdir_and_volumes(which):
    dfp = parse(which)
    final = stages(dfp)[-1]
    assert [json.loads(v) for v in instructions(final, "ENTRYPOINT")] == [["xpconv"]]
    assert all(isinstance(json.loads(v), list) for v in instructions(final, "CMD"))
    users = instructions(final, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{which}: runs as {users}"
    assert any("useradd" in v and users[-1].split(":")[0] in v for v in instructions(final, "RUN"))
    workdir = instructions(final, "WORKDIR")[-1]
    volumes = [p for v in instructions(final, "VOLUME") for p in json.loads(v)]
    env = final_env(final)
    assert env["XPCONV_DATA_DIR"] in volumes, "the dataset cache must be a volume"
    assert env["XDG_CACHE_HOME"].startswith(env["XPCONV_DATA_DIR"] + "/"), "caches belong in the data volume"
    assert f"{workdir}/runs" in volumes, "runs/<timestamp> (relative to WORKDIR) must be a volume"
    # the volumes exist in the image and belong to the user, so named volumes start writable
    setup = " ".join(instructions(final, "RUN"))
    for path in volumes:
        assert path in setup and "chown" in setup


def compose() -> dict:
    with open(DOCKER / "compose.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("service,which", [("gpu", "cuda"), ("cpu", "cpu")])
def test_compose_services_build_the_right_image(service, which):
    c = compose()
    svc = c["services"][service]
    context = (DOCKER / svc["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILES[which]
    final = stages(parse(which))[-1]
    volumes = {p for v in instructions(final, "VOLUME") for p in json.loads(v)}
    mounted = {}
    for spec in svc["volumes"]:
        source, target = spec.split(":")[:2]
        mounted[target] = source
    assert set(mounted) == volumes, f"{service} mounts {mounted}, the image declares {volumes}"
    assert set(mounted.values()) <= set(c["volumes"]), "use the named volumes declared at the top level"


def test_compose_gpu_service_reserves_gpus():
    c = compose()
    devices = c["services"]["gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in c["services"]["cpu"]


# --------------------------------------------------------------------------- build context


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per line of a .dockerignore, with Docker's matching rules: patterns
    are relative to the context root, `*` and `?` stop at `/`, `**` crosses folders, `!` re-includes."""
    rules = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                j = pattern.index("]", i)
                body = pattern[i + 1 : j]
                rx, i = rx + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", j + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(rx + r"\Z")))
    return rules


def ignored(rel: str, rules) -> bool:
    """Docker's verdict: the last rule matching the path or one of its parent folders wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    verdict = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            verdict = not negate
    return verdict


def copy_build_context(dest: Path) -> Path:
    """Copy the repository as `docker build .` would send it, honouring .dockerignore."""
    rules = dockerignore_rules(ROOT / ".dockerignore")
    prune = not any(negate for negate, _ in rules)
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        if prune:
            dirnames[:] = [d for d in dirnames if not ignored(rel_dir + d, rules)]
        for name in filenames:
            rel = rel_dir + name
            if not ignored(rel, rules):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.join(dirpath, name), dest / rel)
    return dest


def test_dockerignore_rules_follow_docker():
    rules = dockerignore_rules(ROOT / ".dockerignore")
    assert ignored(".git/config", rules) and ignored("xpconv/__pycache__/ops.cpython-312.pyc", rules)
    assert ignored("__pycache__/x.pyc", rules) and ignored("runs/20260101-000000/metrics.json", rules)
    assert not ignored("xpconv/data/digits.csv.gz", rules) and not ignored("pyproject.toml", rules)


def test_build_context_holds_what_the_wheel_needs(tmp_path):
    context = copy_build_context(tmp_path)
    files = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert "pyproject.toml" in files
    readme = pyproject()["project"].get("readme")
    if readme:
        assert readme in files
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "xpconv").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert package <= files, f"missing from the build context: {sorted(package - files)}"
    assert not any(f.startswith((".git/", "tests/", "runs/")) or "__pycache__" in f for f in files)


# --------------------------------------------------------------------------- the CPU image, for real


class ImageBuild:
    """Replays a Dockerfile's instructions on this machine: container paths live under `root`,
    ENV is tracked per stage, COPY copies, and the RUN lines that install Python packages (pip,
    venv) run in bash; the rest (useradd, chown, apt-get) needs root and is recorded only."""

    def __init__(self, dockerfile: Path, context: Path, root: Path):
        self.dfp = load(dockerfile)
        self.context, self.root = context, root
        self.shim = root / ".shim"  # `python`/`python3` -> the interpreter running the tests
        self.shim.mkdir(parents=True)
        for name in ("python", "python3"):
            exe = self.shim / name
            exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
            exe.chmod(0o755)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def path(self, container_path: str, cwd: Path | None = None) -> Path:
        if container_path.startswith("/"):
            return self.root / container_path.lstrip("/")
        return (cwd or self.root) / container_path

    def map_paths(self, text: str, owned: list[str]) -> str:
        for p in sorted(owned, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(p)}(?=[/\s\"':)\]]|$)", str(self.path(p)), text)
        return text

    def owned_paths(self) -> list[str]:
        owned = set()
        for ins in self.dfp.structure:
            kind, value = ins["instruction"], ins["value"]
            if kind == "WORKDIR":
                owned.add(value)
            elif kind == "COPY":
                owned.update(w for w in value.split() if w.startswith("/"))
            elif kind == "VOLUME":
                owned.update(json.loads(value))
            elif kind == "ENV":
                owned.update(v for _, v in env_pairs(value) if v.startswith("/") and "$" not in v)
        return sorted(owned)

    def run(self) -> tuple[dict[str, str], Path]:
        """Replay every stage; return the final stage's environment and working directory."""
        owned = self.owned_paths()
        host = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        for stage in stages(self.dfp):
            env = {**host, "PATH": f"{self.shim}:{host['PATH']}"}
            cwd = self.root
            for ins in stage[1:]:
                kind, value = ins["instruction"], ins["value"]
                if kind == "ENV":
                    for key, val in env_pairs(value):
                        env[key] = string.Template(self.map_paths(val, owned)).safe_substitute(env)
                elif kind == "WORKDIR":
                    cwd = self.path(value, cwd)
                    cwd.mkdir(parents=True, exist_ok=True)
                elif kind == "COPY":
                    words = value.split()
                    from_stage = any(w.startswith("--from=") for w in words)
                    src, dst = [w for w in words if not w.startswith("--")]
                    source = self.path(src) if from_stage else self.context / src
                    target = self.path(dst, cwd)
                    if source.resolve() != target.resolve():
                        shutil.copytree(source, target, dirs_exist_ok=True)
                elif kind == "RUN":
                    if not re.search(r"\bpip\b|\bvenv\b", value):
                        self.skipped.append(value)
                        continue
                    # the one change: pip may use its cache here, so a re-run downloads nothing
                    line = self.map_paths(value.replace("--no-cache-dir ", ""), owned)
                    self.ran.append(line)
                    subprocess.run(["bash", "-euc", line], cwd=cwd, env=env, check=True, timeout=600)
        return env, cwd


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu-image")
    context = copy_build_context(tmp / "context")
    build = ImageBuild(DOCKERFILES["cpu"], context, tmp / "root")
    env, cwd = build.run()
    return build, env, cwd


def xpconv(env, cwd, *args, timeout=300):
    return subprocess.run(["xpconv", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_image_installs_in_a_fresh_venv(cpu_image):
    build, env, cwd = cpu_image
    assert any("pip wheel" in line for line in build.ran) and any("pip install" in line for line in build.ran)
    assert all("useradd" in line for line in build.skipped), f"RUN lines not replayed: {build.skipped}"
    venv = Path(env["VIRTUAL_ENV"])
    assert venv.is_relative_to(build.root) and (venv / "bin" / "xpconv").exists()
    python = str(venv / "bin" / "python")
    probe = subprocess.run(
        [python, "-c", "import sys, xpconv, importlib.resources as r; "
         "print(sys.prefix); print(xpconv.__file__); "
         "print(r.files('xpconv').joinpath('data/digits.csv.gz').is_file())"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    assert Path(probe[0]) == venv, "the image's python must be the venv's"
    assert Path(probe[1]).is_relative_to(venv), f"xpconv imported from {probe[1]}, not the installed wheel"
    assert probe[2] == "True", "the bundled digits dataset is missing from the installed package"
    report = json.loads(
        subprocess.run([python, "-m", "xpconv.info", "--json"], cwd=cwd, env=env,
                       capture_output=True, text=True, check=True).stdout
    )
    assert report["xpconv"] == __version__
    assert report["packages"]["cupy"] is None and report["auto_device"] == {"device": "cpu", "namespace": "numpy"}
    assert report["packages"]["torch"] is None, "a fresh venv: nothing from the host's site-packages"
    assert report["blas"]["libraries"], report["blas"]


@pytest.mark.slow
def test_cpu_image_command_info_and_one_epoch(cpu_image, tmp_path):
    build, env, cwd = cpu_image
    if not (ROOT / "xpconv" / "cli.py").exists():
        pytest.skip("xpconv/cli.py (the `xpconv` command) is not in this tree yet")
    version = xpconv(env, cwd, "--version")
    assert version.returncode == 0 and __version__ in version.stdout + version.stderr, version
    info = xpconv(env, cwd, "info")
    assert info.returncode == 0, info.stderr
    assert "--device auto picks: cpu (numpy)" in info.stdout
    out = tmp_path / "run"
    train = xpconv(env, cwd, "train", "--dataset", "digits", "--epochs", "1", "--out", str(out), "--quiet")
    assert train.returncode == 0, train.stdout + train.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and 0.0 <= metrics["final"]["test_acc"] <= 1.0
