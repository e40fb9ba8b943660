"""`llama4-quant download` against a Hub stand-in, with the real huggingface_hub client.

Most scenarios run the command in-process (click's CliRunner) with huggingface_hub's import-time constants patched to
the stand-in; the ones about what reaches stdout/stderr/disk run it as a subprocess with a clean environment. In both,
every HTTP(S) proxy variable points at a trap server, so a request for anything but 127.0.0.1 is recorded and fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama4_quant.cli.main import cli
from llama4_quant.hub import download as dl
from support.hub_server import HubStandIn, git_blob_sha1, point_client_at, sample_llama4_repo

REPO = "meta-llama/Llama-4-Tiny-Instruct"
GATED = "meta-llama/Llama-4-Tiny-Gated"
TOKEN = "hf_l4qTESTtokenZ9x8w7v6u5t4s3r2q1"  # distinctive, so any leak is easy to spot

HF_FILES = {
    "LICENSE",
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
ORIGINAL_FILES = {"original/params.json", "original/consolidated.00.pth", "original/tokenizer.model"}
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
BIG = 12 * 1024 * 1024 + 4096  # > huggingface_hub's 10 MiB read chunk, so a cut transfer resumes with Range


@pytest.fixture(scope="module")
def files():
    return sample_llama4_repo()


@pytest.fixture(scope="module")
def big_files():
    return sample_llama4_repo(big_shard_size=BIG)


@pytest.fixture
def hub(files, tmp_path, monkeypatch):
    """The stand-in Hub, with huggingface_hub in this process pointed at it and at a throw-away HF_HOME."""
    from huggingface_hub.utils import close_session

    with HubStandIn() as h:
        h.add_repo(REPO, files)
        h.add_repo(GATED, files, gated=True, authorized_tokens={TOKEN})
        point_client_at(h, monkeypatch, str(tmp_path / "hf_home"))
        yield h
        close_session()
        assert h.escaped == [], f"requests tried to leave 127.0.0.1: {h.escaped}"


def run(*args, env=None):
    return CliRunner().invoke(cli, ["download", *args], env=env, catch_exceptions=False)


def on_disk(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def assert_identical(root: Path, hub: HubStandIn, repo: str, paths):
    for p in paths:
        assert (root / p).read_bytes() == hub.file(repo, p).data, p


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines, result.stderr
    assert lines[-1].startswith("error: "), result.stderr
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------------


def test_full_download_json_and_hashes(hub, tmp_path):
    out = tmp_path / "out"
    r = run(REPO, "--local-dir", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert on_disk(out) == HF_FILES
    assert_identical(out, hub, REPO, HF_FILES)
    assert summary["repo_id"] == REPO and summary["revision"] == "main"
    assert summary["commit"] == hub.repos[REPO].refs["main"]
    assert Path(summary["local_dir"]) == out.resolve()
    assert summary["total_bytes"] == sum(hub.file(REPO, p).size for p in HF_FILES)
    assert isinstance(summary["seconds"], float)
    by_path = {f["path"]: f for f in summary["files"]}
    assert set(by_path) == HF_FILES
    for p, f in by_path.items():
        data = hub.file(REPO, p).data
        assert f["verified"] is True and f["size"] == len(data)
        if p.endswith(".safetensors"):
            assert f["sha256"] == hashlib.sha256(data).hexdigest() and "git_sha1" not in f
        else:
            assert f["git_sha1"] == git_blob_sha1(data) and "sha256" not in f
    # LFS content came from the CDN, without the Authorization header
    cdn = [q for q in hub.requests if q.server == "cdn"]
    assert {q.path for q in cdn} == {SHARD1, SHARD2} and not any(q.authorized for q in cdn)


def test_rerun_fetches_nothing_and_prints_table(hub, tmp_path):
    out = tmp_path / "out"
    assert run(REPO, "--local-dir", str(out)).exit_code == 0
    before = hub.get_counts(REPO)
    assert before == {p: 1 for p in HF_FILES}
    r = run(REPO, "--local-dir", str(out))
    assert r.exit_code == 0, r.stderr
    assert hub.get_counts(REPO) == before
    assert not hub.requests_for(REPO, method="HEAD")[len(HF_FILES) :]  # no new HEADs either
    assert "11 (0 downloaded, 11 already present)" in r.stdout
    assert "verified" in r.stdout and "11/11" in r.stdout


def test_resume_within_a_run_after_connection_drop(big_files, hub, tmp_path):
    hub.add_repo(REPO, big_files)
    hub.drop_after(REPO, SHARD2, 11 * 1024 * 1024)
    out = tmp_path / "out"
    r = run(REPO, "--local-dir", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    gets = hub.requests_for(REPO, SHARD2, "GET")
    assert len(gets) == 2
    assert gets[0].range is None and gets[1].range == f"bytes={10 * 1024 * 1024}-"  # resumed, not restarted
    assert gets[1].status == 206
    assert_identical(out, hub, REPO, HF_FILES)


def test_resume_across_runs_keeps_finished_files(big_files, hub, tmp_path):
    hub.add_repo(REPO, big_files)
    hub.drop_after(REPO, SHARD2, 11 * 1024 * 1024)
    hub.fail_with(REPO, SHARD2, 503)  # the retry hits an outage: the run gives up
    out = tmp_path / "out"
    r1 = run(REPO, "--local-dir", str(out), "--max-workers", "2")
    assert r1.exit_code != 0
    line = error_line(r1)
    assert SHARD2 in line and "503" in line and "rerun" in line
    assert not (out / SHARD2).exists()
    finished = HF_FILES - {SHARD2}
    assert_identical(out, hub, REPO, finished)
    counts = hub.get_counts(REPO)
    assert counts[SHARD2] == 2 and all(counts[p] == 1 for p in finished)

    r2 = run(REPO, "--local-dir", str(out), "--json")
    assert r2.exit_code == 0, r2.stderr
    counts2 = hub.get_counts(REPO)
    assert counts2[SHARD2] == 3
    assert all(counts2[p] == 1 for p in finished), counts2  # finished files were not downloaded again
    assert_identical(out, hub, REPO, HF_FILES)
    downloaded = {f["path"] for f in json.loads(r2.stdout)["files"] if f["downloaded"]}
    assert downloaded == {SHARD2}


@pytest.mark.parametrize("bad", [SHARD1, "config.json"])
def test_corrupt_file_is_named_deleted_and_refetched(hub, tmp_path, bad):
    hub.corrupt(REPO, bad)
    out = tmp_path / "out"
    r = run(REPO, "--local-dir", str(out))
    assert r.exit_code != 0
    line = error_line(r)
    algo = "sha256" if bad.endswith(".safetensors") else "git sha1"
    assert bad in line and algo in line and "deleted" in line and "rerun" in line
    assert not (out / bad).exists()
    assert_identical(out, hub, REPO, HF_FILES - {bad})

    hub.corrupt(REPO, bad, on=False)
    before = hub.get_counts(REPO)
    r2 = run(REPO, "--local-dir", str(out))
    assert r2.exit_code == 0, r2.stderr
    after = hub.get_counts(REPO)
    assert {p for p in after if after[p] != before.get(p)} == {bad}
    assert_identical(out, hub, REPO, HF_FILES)


def test_corrupt_file_in_the_cache_loses_its_blob_too(hub, tmp_path):
    hub.corrupt(REPO, SHARD1)
    assert run(REPO).exit_code != 0
    storage = tmp_path / "hf_home" / "hub" / f"models--{REPO.replace('/', '--')}"
    sha = hub.file(REPO, SHARD1).sha256
    assert not (storage / "blobs" / sha).exists()  # else huggingface_hub would re-link the bad blob
    hub.corrupt(REPO, SHARD1, on=False)
    r = run(REPO, "--json")
    assert r.exit_code == 0, r.stderr
    snap = Path(json.loads(r.stdout)["local_dir"])
    assert (snap / SHARD1).read_bytes() == hub.file(REPO, SHARD1).data
    assert hub.get_count(REPO, SHARD1) == 2 and hub.get_count(REPO, "config.json") == 1


def test_gated_without_token_401(hub, tmp_path):
    r = run(GATED, "--local-dir", str(tmp_path / "out"))
    assert r.exit_code != 0
    line = error_line(r)
    assert f"https://huggingface.co/{GATED}" in line and "licence" in line
    assert "--token" in line and "HF_TOKEN" in line and "401" in line
    assert r.stderr.count("\n") == 1  # one line, nothing else
    assert hub.get_counts(GATED) == {}


def test_gated_with_token_without_access_403(hub, tmp_path):
    wrong = "hf_WRONGtokenQQQ111222333"
    r = run(GATED, "--local-dir", str(tmp_path / "out"), "--token", wrong)
    assert r.exit_code != 0
    line = error_line(r)
    assert f"https://huggingface.co/{GATED}" in line and "403" in line and "--token" in line
    assert wrong not in r.stderr + r.stdout
    assert wrong in hub.tokens_seen  # it was sent, just not accepted


def test_gated_with_access(hub, tmp_path):
    out = tmp_path / "out"
    r = run(GATED, "--local-dir", str(out), "--token", TOKEN)
    assert r.exit_code == 0, r.stderr
    assert_identical(out, hub, GATED, HF_FILES)
    assert TOKEN not in r.stdout + r.stderr


def test_repo_and_revision_not_found(hub, tmp_path):
    r = run("meta-llama/No-Such-Model", "--local-dir", str(tmp_path / "a"))
    assert r.exit_code != 0
    assert "not found" in error_line(r) and "meta-llama/No-Such-Model" in error_line(r)
    r = run(REPO, "--revision", "v9.9", "--local-dir", str(tmp_path / "b"))
    assert r.exit_code != 0
    assert "revision 'v9.9' not found" in error_line(r)
    r = run("not-a-repo-id", "--local-dir", str(tmp_path / "c"))
    assert r.exit_code != 0 and "org/name" in error_line(r)


def test_revision_is_pinned(hub, files, tmp_path):
    changed = dict(files, **{"config.json": b'{"model_type": "llama4", "v": 2}'})
    sha = hub.repos[REPO].add_revision("v2", changed)
    r = run(REPO, "--revision", "v2", "--local-dir", str(tmp_path / "out"), "--include", "config.json", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["commit"] == sha
    assert (tmp_path / "out" / "config.json").read_bytes() == changed["config.json"]


def test_not_enough_disk_space(hub, tmp_path, monkeypatch):
    real = dl.disk_free_bytes
    monkeypatch.setattr(dl, "disk_free_bytes", lambda path: 1000)
    r = run(REPO, "--local-dir", str(tmp_path / "out"))
    assert r.exit_code != 0
    line = error_line(r)
    assert "not enough disk space" in line and "free" in line
    assert hub.get_counts(REPO) == {}  # refused before fetching anything
    monkeypatch.setenv(dl.FREE_BYTES_ENV, "10")  # the subprocess-friendly switch
    assert real(tmp_path) == 10


@pytest.mark.parametrize(
    "layout,expected",
    [("original", ORIGINAL_FILES), ("both", HF_FILES | ORIGINAL_FILES)],
)
def test_layouts(hub, tmp_path, layout, expected):
    out = tmp_path / layout
    r = run(REPO, "--local-dir", str(out), "--layout", layout, "--json")
    assert r.exit_code == 0, r.stderr
    assert on_disk(out) == expected
    assert_identical(out, hub, REPO, expected)
    assert all(f["verified"] for f in json.loads(r.stdout)["files"])


def test_include_narrows_the_layout(hub, tmp_path):
    out = tmp_path / "json"
    r = run(REPO, "--local-dir", str(out), "--include", "*.json")
    assert r.exit_code == 0, r.stderr
    assert on_disk(out) == {p for p in HF_FILES if p.endswith(".json")}
    out = tmp_path / "orig"
    r = run(REPO, "--local-dir", str(out), "--layout", "both", "--include", "original/", "--include", "config.json")
    assert r.exit_code == 0, r.stderr
    assert on_disk(out) == ORIGINAL_FILES | {"config.json"}
    r = run(REPO, "--local-dir", str(tmp_path / "none"), "--include", "*.gguf")
    assert r.exit_code != 0 and "*.gguf" in error_line(r)


def test_tree_api_fallback_with_pagination(hub, tmp_path):
    hub.info_without_blobs = True
    hub.tree_page_size = 4
    out = tmp_path / "out"
    r = run(REPO, "--local-dir", str(out), "--layout", "both", "--json")
    assert r.exit_code == 0, r.stderr
    assert on_disk(out) == HF_FILES | ORIGINAL_FILES
    assert all(f["verified"] for f in json.loads(r.stdout)["files"])
    assert len([q for q in hub.requests if "/tree/" in q.url]) > 2  # followed the Link pages


def test_network_failure(hub, tmp_path, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", dead)
    r = run(REPO, "--local-dir", str(tmp_path / "out"))
    assert r.exit_code != 0
    line = error_line(r)
    assert "network failure" in line and dead in line


def test_cache_mode_and_offline_reuse(hub, tmp_path, monkeypatch):
    r = run(REPO, "--json")
    assert r.exit_code == 0, r.stderr
    snap = Path(json.loads(r.stdout)["local_dir"])
    commit = hub.repos[REPO].refs["main"]
    assert (
        snap == (tmp_path / "hf_home" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit).resolve()
    )
    assert on_disk(snap) == HF_FILES
    assert_identical(snap, hub, REPO, HF_FILES)
    # the Hub goes away: the verified copy is reused
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = run(REPO, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["offline"] is True and Path(json.loads(r.stdout)["local_dir"]) == snap


# ---------------------------------------------------------------------------------------------------------------------
# the token never shows up (subprocess: everything the process prints or writes is ours to inspect)


CLI_CODE = "import sys; from llama4_quant.cli.main import cli; sys.exit(cli(prog_name='llama4-quant'))"
SRC_ROOT = str(Path(__file__).resolve().parents[2])  # works whether or not the package is pip-installed


def _with_src(env):
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [SRC_ROOT, env.get("PYTHONPATH")])))


def _cli_subprocess(args, env):
    cmd = [sys.executable, "-c", CLI_CODE, *args]
    return subprocess.run(cmd, env=_with_src(env), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("source", ["flag", "env", "login"])
def test_token_never_printed_or_written(files, tmp_path, source):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    out = tmp_path / "out"
    with HubStandIn() as h:
        h.add_repo(GATED, files, gated=True, authorized_tokens={TOKEN})
        env = h.client_env(hf_home=str(hf_home))
        env["HF_DEBUG"] = "1"  # huggingface_hub's most talkative mode: still nothing
        args = ["download", GATED, "--local-dir", str(out), "--layout", "both", "--json"]
        if source == "flag":
            args += ["--token", TOKEN]
        elif source == "env":
            env["HF_TOKEN"] = TOKEN
        else:
            (hf_home / "token").write_text(TOKEN)  # what `hf auth login` leaves behind
        r = _cli_subprocess(args, env)
        assert r.returncode == 0, r.stderr
        assert TOKEN in h.tokens_seen  # it was used ...
        assert h.escaped == []
        summary = json.loads(r.stdout)
    assert {f["path"] for f in summary["files"]} == HF_FILES | ORIGINAL_FILES
    # ... and is nowhere else
    assert TOKEN not in r.stdout and TOKEN not in r.stderr
    token_store = {hf_home / "token", hf_home / "stored_tokens"}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in token_store]
    assert any(p.name == "download.json" for p in written)  # our manifest is among them
    for p in written:
        assert TOKEN.encode() not in p.read_bytes(), p


def test_failure_output_has_no_token_either(files, tmp_path):
    with HubStandIn() as h:
        h.add_repo(GATED, files, gated=True, authorized_tokens={"hf_someone_else"})
        env = h.client_env(hf_home=str(tmp_path / "hf_home"))
        r = _cli_subprocess(["download", GATED, "--local-dir", str(tmp_path / "out"), "--token", TOKEN], env)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")  # exactly one line
    assert "403" in r.stderr and TOKEN not in r.stderr + r.stdout
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def test_ctrl_c_then_rerun_resumes(big_files, tmp_path):
    """An interrupted download (SIGINT mid-file) exits 130 and leaves finished files; the rerun fetches only the rest."""
    import signal
    import time

    out = tmp_path / "out"
    with HubStandIn() as h:
        h.add_repo(REPO, big_files)
        h.stall_after(REPO, SHARD2, 4 * 1024 * 1024)
        env = h.client_env(hf_home=str(tmp_path / "hf_home"))
        args = [sys.executable, "-c", CLI_CODE, "download", REPO, "--local-dir", str(out)]
        # a test run started as a background job of a non-interactive shell (`bash .ci/run &`) has SIGINT ignored,
        # and the child would inherit that (Python keeps an ignored SIGINT ignored): give it the default, as a
        # terminal would
        p = subprocess.Popen(args, env=_with_src(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert h.stalled.wait(30)
            finished = HF_FILES - {SHARD2}
            deadline = time.monotonic() + 20
            while on_disk(out) != finished and time.monotonic() < deadline:
                time.sleep(0.05)
            assert on_disk(out) == finished
            p.send_signal(signal.SIGINT)
            time.sleep(1.0)  # let the main thread take the signal first, even on a loaded machine (0.2 s failed once)
            h.release.set()  # data flows again: the worker sees the cancellation at its next chunk
            _, err = p.communicate(timeout=30)
        finally:
            p.kill()
        assert p.returncode == 130, err
        assert err.strip().splitlines()[-1] == "error: interrupted"
        assert on_disk(out) == finished
        assert not list(out.rglob("*.incomplete"))  # huggingface_hub cleaned up its temporary file
        counts = h.get_counts(REPO)

        r = _cli_subprocess(["download", REPO, "--local-dir", str(out), "--json"], env)
        assert r.returncode == 0, r.stderr
        after = h.get_counts(REPO)
        assert after[SHARD2] == counts[SHARD2] + 1 and all(after[p] == counts[p] for p in finished)
        assert_identical(out, h, REPO, HF_FILES)
        assert h.escaped == []
