"""`resolve_model`: local paths pass through untouched; repo ids are downloaded (hf layout) or reused."""

from __future__ import annotations

import pytest

from llama4_quant.errors import CheckpointError, Llama4QuantError
from llama4_quant.hub import download as dl
from llama4_quant.hub import resolve_model
from llama4_quant.hub.errors import GatedRepoAccessError
from llama4_quant.hub.resolve import looks_like_repo_id
from support.hub_server import HubStandIn, point_client_at, sample_llama4_repo

REPO = "meta-llama/Llama-4-Tiny-Instruct"


@pytest.fixture
def no_network(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("resolve_model must not download a local path")

    monkeypatch.setattr(dl, "download_model", boom)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub.utils import close_session

    with HubStandIn() as h:
        h.add_repo(REPO, sample_llama4_repo())
        h.add_repo("meta-llama/Gated", sample_llama4_repo(), gated=True)
        point_client_at(h, monkeypatch, str(tmp_path / "hf_home"))
        yield h
        close_session()
        assert h.escaped == []


def test_local_paths_are_returned_as_is(tmp_path, monkeypatch, no_network):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert resolve_model(str(ckpt)) == ckpt
    assert resolve_model(ckpt / "config.json") == ckpt / "config.json"
    # a relative folder that happens to look like org/name is still a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta-llama" / "Llama-4-Scout").mkdir(parents=True)
    assert resolve_model("meta-llama/Llama-4-Scout").resolve() == (tmp_path / "meta-llama" / "Llama-4-Scout").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/ckpt") == ckpt


@pytest.mark.parametrize("bad", ["./missing", "missing.safetensors", "/nope/x", "a/b/c", "org/na me", "org/"])
def test_neither_path_nor_repo_id(bad, no_network):
    assert not looks_like_repo_id(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_model(bad)


def test_repo_id_is_downloaded_into_the_cache_then_reused(hub, tmp_path):
    path = resolve_model(REPO, quiet=True)
    commit = hub.repos[REPO].refs["main"]
    assert path.name == commit and path.parent.name == "snapshots"
    assert (path / "config.json").read_bytes() == hub.file(REPO, "config.json").data
    assert not (path / "original").exists()  # hf layout only
    gets = hub.get_counts(REPO)
    assert resolve_model(REPO, quiet=True) == path
    assert hub.get_counts(REPO) == gets  # nothing fetched twice


def test_offline_reuses_a_verified_download(hub, monkeypatch):
    import huggingface_hub.constants as C

    path = resolve_model(REPO, quiet=True)
    n = len(hub.requests)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    assert resolve_model(REPO, quiet=True) == path
    assert len(hub.requests) == n
    with pytest.raises(Llama4QuantError, match="HF_HUB_OFFLINE"):
        resolve_model(REPO, revision="v2", quiet=True)  # never downloaded: nothing to fall back on


def test_revision_and_local_dir(hub, tmp_path):
    sha = hub.repos[REPO].add_revision("v2", dict(sample_llama4_repo(), **{"config.json": b'{"v": 2}'}))
    out = tmp_path / "scout"
    assert resolve_model(f"{REPO}@v2", local_dir=out, quiet=True) == out.resolve()
    assert (out / "config.json").read_bytes() == b'{"v": 2}'
    assert resolve_model(REPO, revision=sha, local_dir=tmp_path / "pinned", quiet=True).is_dir()


def test_hub_errors_are_one_line_llama4quant_errors(hub):
    with pytest.raises(GatedRepoAccessError) as e:
        resolve_model("meta-llama/Gated", quiet=True)
    assert isinstance(e.value, Llama4QuantError)
    assert "https://huggingface.co/meta-llama/Gated" in str(e.value) and "\n" not in str(e.value)
