"""Calibration sources: text, JSONL (text / chat messages / recipe fields), JSON, folders, deterministic sampling,
Hub datasets through the real huggingface_hub client (against the Hub stand-in), and the offline message."""

from __future__ import annotations

import json

import pytest
import torch

from llama4_quant.calibration.dataset import DEFAULT_RECIPE, load_calibration, repo_recipe_path, sample_windows
from llama4_quant.calibration.documents import CalibrationError, Document, render_chat
from llama4_quant.calibration.hub import choose_files, parse_hub_spec
from llama4_quant.model.tokenizer import LoadedTokenizer
from llama4_quant.tiny.corpus import generate_corpus
from llama4_quant.tiny.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> LoadedTokenizer:
    t = build_tokenizer(generate_corpus(20000, seed=5), vocab_size=300, num_special_tokens=19)
    return LoadedTokenizer(t, tmp_path_factory.mktemp("tok") / "tokenizer.json", t.token_to_id("<|begin_of_text|>"))


@pytest.fixture(scope="module")
def text() -> str:
    return generate_corpus(30000, seed=7)


def test_render_chat_is_llama4_format():
    s = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "image"}]}, {"role": "assistant", "content": "Hello"}])
    assert s == ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
                 "<|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\nHello<|eot|>")


def test_text_file_deterministic_by_seed(tok, text, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(text)
    a = load_calibration(str(f), tok, 6, 64, seed=0)
    b = load_calibration(str(f), tok, 6, 64, seed=0)
    c = load_calibration(str(f), tok, 6, 64, seed=1)
    assert a.tokens.shape == (6, 64) and torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert (a.tokens[:, 0] == tok.bos_id).all()
    assert a.info["tokens_sha256"] == b.info["tokens_sha256"] != c.info["tokens_sha256"]
    assert a.info["files"][0]["name"] == "c.txt" and len(a.info["files"][0]["sha256"]) == 64
    assert a.info["kind"] == "local" and a.info["warnings"] == []


def test_jsonl_text_messages_and_json(tok, tmp_path):
    lines = [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
             {"messages": [{"role": "user", "content": "What is two plus two?"},
                           {"role": "assistant", "content": "Two plus two is four."}]},
             {"conversations": [{"from": "human", "value": "Name a city."}, {"from": "gpt", "value": "Paris."}]},
             {"text": "   "}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cs = load_calibration(str(f), tok, 40, 8, seed=0)  # asks for more than there is: every document is used
    assert cs.info["documents"] == cs.info["documents_used"] == 3 and cs.info["chat_documents"] == 2
    ids = tok.encode(render_chat(lines[1]["messages"]), add_bos=False)
    header = tok.tokenizer.token_to_id("<|header_start|>")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids.count(header) == 2  # markers are special tokens
    stream = cs.tokens.reshape(-1).tolist()
    assert header in stream
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"data": lines[:2]}))
    assert load_calibration(str(j), tok, 2, 16, seed=0).info["documents"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: record has no 'text', 'messages' or 'conversations'"):
        load_calibration(str(bad), tok, 2, 16)


def test_folder_short_data_and_errors(tok, tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Alpha beta gamma delta. " * 20)
    (d / "sub" / "b.jsonl").write_text(json.dumps({"text": "Epsilon zeta eta theta. " * 20}) + "\n")
    (d / "notes.md").write_text("ignored")
    cs = load_calibration(str(d), tok, 50, 32, seed=0)
    assert [f["name"] for f in cs.info["files"]] == ["a.txt", "sub/b.jsonl"]
    assert 0 < cs.info["samples"] < 50 and "instead of 50" in cs.info["warnings"][0]
    with pytest.raises(CalibrationError, match="no such file"):
        load_calibration(str(tmp_path / "missing.txt"), tok, 2, 16)
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:  # parquet is optional
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(CalibrationError, match="parquet needs pyarrow"):
            load_calibration(str(tmp_path / "x.parquet"), tok, 2, 16)


def test_sampling_choices():
    docs = [Document(f"d{i}", False) for i in range(10)]
    enc = {f"d{i}": [1000 + i] * 7 for i in range(10)}
    tokens, stats = sample_windows(docs, lambda d: enc[d.text], 3, 5, seed=4, bos_id=9)
    assert tokens.shape == (3, 5) and (tokens[:, 0] == 9).all()
    assert stats["stream_tokens"] >= 15 and stats["documents_used"] <= 3
    one, stats = sample_windows(docs[:1], lambda d: enc[d.text] * 3, 4, 100, seed=0, bos_id=None)
    assert one.shape == (1, 21) and stats["warnings"]


def test_hub_spec_parsing_and_file_choice():
    assert parse_hub_spec("org/name") == parse_hub_spec("org/name@main")
    s = parse_hub_spec("org/na.me@v1.0:data/train.jsonl")
    assert (s.repo_id, s.revision, s.path, s.repo_type) == ("org/na.me", "v1.0", "data/train.jsonl", "dataset")
    names = ["README.md", ".gitattributes", "dataset_info.json", "data/test.jsonl", "data/train.jsonl", "x.json"]
    assert choose_files(names, None) == ["data/train.jsonl"]
    assert choose_files(names, "data/test.jsonl") == ["data/test.jsonl"]
    with pytest.raises(CalibrationError, match="pick one with REPO:PATH"):
        choose_files([f"shard-{i}.jsonl" for i in range(20)], None)


def test_default_recipe_file_matches_code():
    assert json.loads(repo_recipe_path().read_text()) == DEFAULT_RECIPE
    assert DEFAULT_RECIPE["files"] and len(DEFAULT_RECIPE["revision"]) == 40


# ---- the Hub, through huggingface_hub against the stand-in --------------------------------------------------------
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in serves model repos; datasets use the same protocol under /api/datasets/ and /datasets/:
    map those onto its model routes (patched here, in the test, for the stand-in's lifetime)."""
    from huggingface_hub.utils import close_session

    from support import hub_server

    orig = hub_server._Handler._hub

    def _hub(self, method):
        if self.path.startswith("/api/datasets/"):
            self.path = "/api/models/" + self.path[len("/api/datasets/"):]
        elif self.path.startswith("/datasets/"):
            self.path = self.path[len("/datasets"):]
        return orig(self, method)

    monkeypatch.setattr(hub_server._Handler, "_hub", _hub)
    import huggingface_hub.constants as C

    with hub_server.HubStandIn() as h:
        hub_server.point_client_at(h, monkeypatch, str(tmp_path / "hf"))
        monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # frozen at import: keep tests out of ~/.cache
        yield h
        close_session()


def _dolly_like(n: int) -> bytes:
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "context": "" if i % 2 else "Arithmetic.",
             "response": f"{i} plus {i} is {2 * i}.", "category": "qa"} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_hub_dataset_then_offline_from_cache(hub, tok, monkeypatch):
    hub.add_repo("acme/chats", {"README.md": b"# x\n", "train.jsonl": json.dumps(
        {"messages": [{"role": "user", "content": "Hi there, how are you?"},
                      {"role": "assistant", "content": "Fine, thanks for asking!"}]}).encode() + b"\n" +
        json.dumps({"text": "Plain text document number two. " * 4}).encode() + b"\n"})
    cs = load_calibration("acme/chats", tok, 3, 16, seed=0)
    sha = hub.repos["acme/chats"].refs["main"]
    assert cs.info["hub"] == {"repo": "acme/chats", "revision": "main", "commit": sha, "from_cache": False}
    assert cs.info["files"][0]["name"] == "train.jsonl" and cs.info["chat_documents"] == 1
    assert hub.get_count("acme/chats", "train.jsonl") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    again = load_calibration("acme/chats", tok, 3, 16, seed=0)
    assert torch.equal(again.tokens, cs.tokens) and again.info["hub"]["from_cache"] is True
    with pytest.raises(CalibrationError) as e:
        load_calibration("acme/never-fetched", tok, 3, 16)
    msg = str(e.value)
    assert "\n" not in msg and "acme/never-fetched" in msg and "HF_HUB_OFFLINE" in msg and "--calib FILE" in msg


def test_default_recipe_from_hub_and_unreachable_hub(hub, tok, monkeypatch):
    data = _dolly_like(40)
    import hashlib

    recipe = dict(DEFAULT_RECIPE, dataset="acme/dolly", revision="main",
                  files={"dolly.jsonl": hashlib.sha256(data).hexdigest()})
    hub.add_repo("acme/dolly", {"dolly.jsonl": data, "README.md": b"x"})
    monkeypatch.setattr("llama4_quant.calibration.dataset.default_recipe", lambda: recipe)
    cs = load_calibration(None, tok, 4, 32)
    assert cs.info["kind"] == "hub" and cs.info["recipe"]["dataset"] == "acme/dolly"
    assert cs.info["chat_documents"] == 40 and cs.tokens.shape == (4, 32)
    recipe["files"] = {"dolly.jsonl": "0" * 64}
    with pytest.raises(CalibrationError, match="does not match the recipe's sha256"):
        load_calibration(None, tok, 4, 32)
    with pytest.raises(CalibrationError, match="not found on the Hub"):
        load_calibration("acme/nope", tok, 2, 16)
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(CalibrationError, match="could not be fetched .*unreachable.*pass --calib FILE"):
        load_calibration("acme/other", tok, 2, 16)


def test_cli_offline_message_is_one_line(cli, tmp_path):
    """No --calib and no network: one clear line, non-zero exit, no output directory."""
    from llama4_quant.tiny.checkpoints import text_config, write_hf_checkpoint

    src = write_hf_checkpoint(tmp_path / "m", text_config("scout", hidden_size=128, intermediate_size=128,
                                                          intermediate_size_mlp=256, head_dim=32, num_hidden_layers=1))
    tk = build_tokenizer(generate_corpus(5000, seed=1), vocab_size=256, num_special_tokens=19)
    tk.save(str(src / "tokenizer.json"))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    r = cli("convert", str(src), str(tmp_path / "out"), env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibration dataset databricks/databricks-dolly-15k")
    assert "--calib FILE" in lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
