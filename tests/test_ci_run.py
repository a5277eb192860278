""".ci/run's handling of `make image`: a failed build fails the run, a build that failed on a download is retried
once. Run on a copy of the script with programs on PATH that stand in for apt-get, podman, mmdebstrap, java, cc and
make and record how they were called (make image fails as each case says; make test succeeds)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_MAKE = """#!/usr/bin/env bash
echo "make $*" >> "$CALLS"
if [ "$1" = image ]; then
  attempt=$(grep -c '^make image$' "$CALLS")
  outcome=$(sed -n "${attempt}p" "$IMAGE_OUTCOMES")
  [ "$outcome" = ok ] && exit 0
  echo "$outcome" >&2
  exit 2
fi
"""


def run_ci(tmp_path: Path, image_outcomes: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`image_outcomes`: per `make image` call, "ok" or the error message the build prints before failing."""
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", checkout / ".ci" / "run")
    fakes = tmp_path / "bin"
    fakes.mkdir()
    for program in ("apt-get", "podman", "mmdebstrap", "java", "cc"):
        (fakes / program).write_text(f'#!/bin/sh\necho "{program} $*" >> "$CALLS"\n')
    (fakes / "make").write_text(FAKE_MAKE)
    (fakes / "id").write_text("#!/bin/sh\necho 0\n")  # root: .ci/run installs with apt-get
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    calls, outcomes = tmp_path / "calls", tmp_path / "outcomes"
    calls.touch()
    outcomes.write_text("".join(line + "\n" for line in image_outcomes))
    env = {**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "CALLS": str(calls), "IMAGE_OUTCOMES": str(outcomes)}
    result = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=60)
    return result, [line for line in calls.read_text().splitlines() if line.startswith("make")]


def test_an_image_that_builds_is_followed_by_the_tests(tmp_path):
    result, makes = run_ci(tmp_path, ["ok"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert makes == ["make image", "make test"]


@pytest.mark.parametrize("error", [
    "E: Failed to fetch http://deb.debian.org/debian/pool/main/o/openjdk-17/x.deb  Connection failed",
    "WARNING: Retrying (Retry(total=0)) after connection broken by 'ReadTimeoutError(\"Read timed out.\")'",
    "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving 'deb.debian.org'",
])
def test_a_download_that_failed_is_retried_once(tmp_path, error):
    result, makes = run_ci(tmp_path, [error, "ok"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert makes == ["make image", "make image", "make test"]
    assert "failed on a download" in result.stdout and "retrying once" in result.stdout


def test_a_download_that_fails_twice_fails_the_run(tmp_path):
    error = "E: Failed to fetch http://deb.debian.org/debian/pool/main/g/gcc-12/x.deb  Connection failed"
    result, makes = run_ci(tmp_path, [error, error])
    assert result.returncode != 0
    assert makes == ["make image", "make image"]  # no tests after a failed build


def test_any_other_build_failure_fails_the_run_without_a_retry(tmp_path):
    result, makes = run_ci(tmp_path, ["Error: building at STEP \"RUN make mar\": exit status 2"])
    assert result.returncode != 0
    assert makes == ["make image"]
    assert "make image FAILED" in result.stdout
