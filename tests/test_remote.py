"""Remote storage: push a finished pipeline, pull it into a fresh clone, and find nothing to do.

The S3 remote is tested against moto's S3 server on 127.0.0.1 (dvc-s3 speaks to it exactly as
to AWS or MinIO, through `endpointurl`); the shared-directory remote is the setup for a team on
one file system. Both follow the commands in the README's Remote storage section.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from conftest import dvc, stages_run

pytestmark = pytest.mark.slow

BUCKET = "retrain-dvc"
CREDENTIALS = {"access_key_id": "test", "secret_access_key": "test"}


@pytest.fixture
def s3_endpoint(monkeypatch) -> str:
    """An empty bucket on a local S3 server; the URL to give `dvc remote modify endpointurl`."""
    pytest.importorskip("dvc_s3")
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")

    # Only the credentials the test gives: never a developer's ~/.aws or a proxy.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")

    werkzeug = logging.getLogger("werkzeug")  # one line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1"
                 ).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    werkzeug.setLevel(level)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout


def add_remote(repo: Path, kind: str, where: str) -> None:
    """The remote as a user sets it up: shared settings in .dvc/config (committed), secrets in
    .dvc/config.local (never committed)."""
    if kind == "s3":
        dvc(repo, "remote", "add", "-d", "storage", f"s3://{BUCKET}/cache")
        dvc(repo, "remote", "modify", "storage", "endpointurl", where)
    else:
        dvc(repo, "remote", "add", "-d", "storage", where)


def add_credentials(repo: Path, kind: str) -> None:
    if kind == "s3":
        for key, value in CREDENTIALS.items():
            dvc(repo, "remote", "modify", "--local", "storage", key, value)


@pytest.mark.parametrize("kind", ["s3", "shared-directory"])
def test_push_then_fresh_clone_pull_is_up_to_date(kind, workspace, tmp_path, request):
    where = (request.getfixturevalue("s3_endpoint") if kind == "s3"
             else str(tmp_path / "team" / "dvc-store"))
    add_remote(workspace, kind, where)
    add_credentials(workspace, kind)
    git(workspace, "add", ".dvc/config")
    git(workspace, "commit", "-qm", f"{kind} remote")
    assert "config.local" not in git(workspace, "ls-files", ".dvc")  # secrets stay local

    pushed = dvc(workspace, "push")
    assert "pushed" in pushed.stdout, pushed.stdout
    if kind == "s3":
        import boto3

        listing = boto3.client("s3", endpoint_url=where, aws_access_key_id="test",
                               aws_secret_access_key="test", region_name="us-east-1"
                               ).list_objects_v2(Bucket=BUCKET, Prefix="cache/")
        assert listing["KeyCount"] > 0
    assert "Everything is up to date" in dvc(workspace, "push").stdout  # nothing left behind

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace), str(clone)], check=True)
    assert not (clone / "models").exists()  # data comes from the remote, not from git
    add_credentials(clone, kind)
    dvc(clone, "pull")

    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    repro = dvc(clone, "repro")
    assert stages_run(repro.stdout) == [], repro.stdout
    assert "is cached" not in repro.stdout  # up to date, not restored from the run-cache
    for path in ("models/model.keras", "models/serving", "data/features/train.npy",
                 "dvclive/head", "reports/figures"):
        assert (clone / path).exists(), path
    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    assert git(clone, "status", "--porcelain") == ""
