"""dsv3_min.serve (`python -m dsv3_min serve`) as its users see it: a real uvicorn server on loopback, started by the
CLI in a subprocess with a TINY checkpoint trained here, driven by the official `openai` client, lm-eval's
`local-completions` model and headless Chromium. Every output is checked against the package's own decoder."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from _tiny_run import TINY_SET, tiny_corpus_fixture  # noqa: F401 (the module-scoped corpus fixture)

from dsv3_min.__main__ import build_parser, main
from dsv3_min.batching import RoutingRecorder
from dsv3_min.checkpoint import load_trained
from dsv3_min.infer import generate

CTX = 512  # the TINY model's context here: an ARC-Easy item fits whole (no truncation rule involved)


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    """A TINY model (NOT a real size) trained 30 steps on the tiny corpus, with a 512-token context. Trained with AdamW
    (not the cpu-tiny preset's Muon): the drafting tests' prompts were chosen on this model (greedy "Love." has its
    MTP drafts both accepted and rejected; on the Muon-trained one every draft of it is accepted)."""
    out = tmp_path_factory.mktemp("serve") / "tiny-run"
    argv = ["train", "--corpus", str(tiny_corpus), "--no-progress", "--out", str(out), "--max-steps", "30",
            "--set", *TINY_SET, f"max_position_embeddings={CTX}", "seq_len=32", "optimizer=adamw", "lr=3e-3"]
    assert main(argv) == 0
    return out


def _serve(run, *flags):
    """`python -m dsv3_min serve --ckpt RUN --port P --max-batch 8 *flags` (no --host: loopback) until the module ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv3_min", "serve", "--ckpt", str(run), "--port", str(port),
                             "--max-batch", "8", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 90, "the server did not start"
        time.sleep(0.2)
    yield {"url": url, "proc": proc, "name": run.name}
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def server(run):
    """The server without drafting (the default, `--draft none`)."""
    yield from _serve(run)


@pytest.fixture(scope="module")
def draft_server(run):
    """The same checkpoint served with `--draft mtp`: MTP drafts, each row's draft verified on its own."""
    yield from _serve(run, "--draft", "mtp")


@pytest.fixture(scope="module")
def model(run):
    """The same checkpoint loaded in this process: the oracle."""
    m, tok = load_trained(run)
    return m.eval(), tok


def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


def health(server) -> dict:
    return httpx.get(server["url"] + "/health").json()


def greedy_ids(model, ids, n, **sampling):
    """The package's own decoder (`infer.generate`) with the server's latent MLA cache, greedy unless `sampling`
    says, stopping at EOS: the new ids."""
    m, tok = model
    kw = {"temperature": 0, "mla_impl": "absorb", **sampling}
    out = generate(m, torch.tensor(ids), n, eos_token_id=tok.eos_id, **kw)[len(ids):].tolist()
    return out[: out.index(tok.eos_id)] if tok.eos_id in out else out


def test_cli_binds_loopback_and_lists_the_model(server):
    """Without --host the server binds 127.0.0.1; /v1/models names the checkpoint and its MoE layout; /health is ok."""
    import psutil
    assert build_parser().parse_args(["serve", "--ckpt", "x"]).host == "127.0.0.1"
    listening = [c.laddr for c in psutil.Process(server["proc"].pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    models = client(server).models.list().data
    assert [m.id for m in models] == [server["name"]]
    assert models[0].model_extra["x_moe"]["n_experts"] == 4
    assert health(server)["status"] == "ok"


def test_cli_mistakes_are_one_error_line(run, tmp_path, capsys):
    """`serve` with a missing checkpoint or a port out of range: one `dsv3: error:` line, exit 2, no server."""
    assert main(["serve", "--ckpt", str(tmp_path / "nope")]) == 2
    assert main(["serve", "--ckpt", str(run), "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("dsv3: error:") for line in err), err


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}],
                         ids=["greedy", "seeded sample"])
def test_completion_is_the_package_decoder(server, model, sampling):
    """A completion's tokens (and text) are exactly `infer.generate`'s for the same prompt: greedy, and sampled
    with the same seed (the request's own generator draws as `generate`'s does)."""
    m, tok = model
    prompt = "the king and the queen"
    r = client(server).completions.create(model=server["name"], prompt=prompt, max_tokens=20, logprobs=1,
                                          extra_body={"x_routing": True}, **sampling)
    ids = tok.encode(prompt, bos=True)
    want = greedy_ids(model, ids, 20, **sampling)
    assert [t["id"] for t in r.choices[0].model_extra["x_routing"]] == want
    with torch.no_grad():  # each token's log p from one full forward of prompt + output (measured gap 5e-7)
        lp = m(torch.tensor([ids + want]))[0].float().log_softmax(-1)
    full = lp[torch.arange(len(ids) - 1, len(ids) + len(want) - 1), torch.tensor(want)]
    torch.testing.assert_close(torch.tensor(r.choices[0].logprobs.token_logprobs), full, atol=5e-6, rtol=0)
    assert r.choices[0].text == tok.decode(want, skip_special=True)
    assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
    assert r.choices[0].finish_reason == ("length" if len(want) == 20 else "stop")


def test_chat_goes_through_the_chat_template(server, model):
    """A greedy chat answer is `generate` on `tok.apply_chat_template(messages)`'s ids, streamed or not."""
    m, tok = model
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "speak thou lord"}]
    want = tok.decode(greedy_ids(model, tok.apply_chat_template(msgs, tokenize=True), 16), skip_special=True)
    c = client(server)
    r = c.chat.completions.create(model=server["name"], messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model=server["name"], messages=msgs, max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None


def test_stream_is_sse_with_usage_and_done(server):
    """Streaming: `data: {json}` chunks whose texts join to the non-streamed text, a usage chunk, then `[DONE]`."""
    body = {"prompt": "my lord", "max_tokens": 12, "temperature": 0}
    whole = httpx.post(server["url"] + "/v1/completions", json=body).json()
    with httpx.stream("POST", server["url"] + "/v1/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_sequence_ends_the_text(server):
    """`stop` cuts the text before the first stop sequence (streamed or not), with finish_reason 'stop'."""
    c = client(server)
    full = c.completions.create(model=server["name"], prompt="the", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3, full
    for stream in (False, True):
        r = c.completions.create(model=server["name"], prompt="the", max_tokens=30, temperature=0, stop=[stop],
                                 stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == full[: full.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(server):
    """The same seed gives the same sample at temperature 1 (top_p 0.9); another seed another sample."""
    c = client(server)
    texts = [c.completions.create(model=server["name"], prompt="the", max_tokens=24, temperature=1.0, top_p=0.9,
                                  seed=s).choices[0].text for s in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_echo_logprobs_are_the_model_log_probabilities(server, model):
    """`echo` + `logprobs`: each prompt token's log p under the model's forward, and the top-1 alternative."""
    m, tok = model
    ids = tok.encode("the queen speak thou", bos=True)
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True,
                                                            "logprobs": 1, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    with torch.no_grad():
        want = m(torch.tensor([ids]))[0].float().log_softmax(-1)
    got = torch.tensor(lp["token_logprobs"][1:len(ids)])
    torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 1
    assert max(lp["top_logprobs"][1].values()) == pytest.approx(want[0].max().item(), abs=1e-4)


def test_routing_is_the_model_routing(server, model):
    """x_routing of generated token t: the experts and weights each MoE layer chose at the position that produced
    it, as a full forward of prompt + output through the model's own routers gives them."""
    m, tok = model
    ids = tok.encode("thou art my love", bos=True)
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": ids, "max_tokens": 10, "temperature": 0,
                                                            "x_routing": True}).json()
    routes = r["choices"][0]["x_routing"]
    seq = ids + [t["id"] for t in routes]
    with torch.no_grad(), RoutingRecorder(m) as rec:
        m(torch.tensor([seq]))
        idx, w = rec.take()
    for k, t in enumerate(routes):
        p = len(ids) - 1 + k
        assert t["experts"] == idx[p].tolist()
        torch.testing.assert_close(torch.tensor(t["weights"]), w[p], atol=2e-4, rtol=0)


BAD = [  # (what, path, body: dict or raw bytes, expected status)
    ("malformed JSON", "/v1/completions", b'{"prompt": "a", ', 400),
    ("prompt of the wrong type", "/v1/completions", {"prompt": 5}, 400),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 99999]}, 400),
    ("prompt longer than the context", "/v1/completions", {"prompt": [5] * (CTX + 1)}, 400),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -1}, 400),
    ("huge max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 10**12}, 400),
    ("max_tokens as a string", "/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400),
    ("negative temperature", "/v1/completions", {"prompt": "a", "temperature": -1}, 400),
    ("top_p of 0", "/v1/completions", {"prompt": "a", "top_p": 0}, 400),
    ("stop of the wrong type", "/v1/completions", {"prompt": "a", "stop": 3}, 400),
    ("n > 1", "/v1/completions", {"prompt": "a", "n": 2}, 400),
    ("echo with stream", "/v1/completions", {"prompt": "a", "echo": True, "stream": True}, 400),
    ("unknown model", "/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404),
    ("body over the size limit", "/v1/completions", {"prompt": "a" * (2 << 20)}, 413),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("message content not a string", "/v1/chat/completions", {"messages": [{"role": "user", "content": 1}]}, 400),
    ("unknown path", "/v1/embeddings", {"input": "a"}, 404),
]


@pytest.mark.parametrize("what,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_carries_on(server, what, path, body, status):
    """Each bad request gets its 4xx with OpenAI's error body (`error.message`, `error.type`); the server still serves."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server["url"] + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    ok = httpx.post(server["url"] + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200


def test_max_tokens_is_capped_by_the_context_left(server):
    """A prompt 5 tokens short of the context gets at most 5 new tokens, whatever max_tokens asks."""
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": [5] * (CTX - 5), "max_tokens": 100,
                                                            "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] <= 5
    assert r["choices"][0]["finish_reason"] == "stop" or r["usage"]["completion_tokens"] == 5


def test_eight_concurrent_clients_equal_single_clients(server, model):
    """8 clients at once (arriving while others are mid-generation) all finish, share decode steps, and each gets
    exactly the tokens it gets alone: greedy (even clients) and seeded samples (odd clients)."""
    words = "the king queen lord lady sword crown night".split()
    prompts = [" ".join(words[i:] + words[:i][: i % 3]) for i in range(8)]
    c = client(server)

    def ask(i, delay=0.0):
        time.sleep(delay)
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": i}
        r = c.completions.create(model=server["name"], prompt=prompts[i], max_tokens=24 + 4 * i, logprobs=1,
                                 extra_body={"x_routing": True}, **sampling)
        ch = r.choices[0]
        return [t["id"] for t in ch.model_extra["x_routing"]], ch.text, ch.logprobs.token_logprobs

    alone = [ask(i) for i in range(8)]
    steps0 = health(server)["steps"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8), [0.03 * i for i in range(8)]))
    assert [x[:2] for x in together] == [x[:2] for x in alone]
    for (_, _, a), (_, _, b) in zip(alone, together):  # the same numbers whatever else shares the batch
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=5e-6, rtol=0)
    assert health(server)["steps"] - steps0 < sum(len(x[0]) for x in alone)  # rows really shared steps
    tok = model[1]
    assert alone[2][0] == greedy_ids(model, tok.encode(prompts[2], bos=True), 32)
    assert alone[3][0] == greedy_ids(model, tok.encode(prompts[3], bos=True), 36, temperature=1.0, seed=3)


def completion(server, prompt, n, **extra) -> dict:
    """One non-streamed completion through httpx (the extensions in the body as a browser sends them)."""
    return httpx.post(server["url"] + "/v1/completions", json={"prompt": prompt, "max_tokens": n, **extra},
                      timeout=120).json()


def test_draft_mtp_greedy_equals_no_draft(server, draft_server, model):
    """`serve --draft mtp`: greedy completions are token for token those of the server without drafting and of
    `generate` (4 prompts x 40 tokens), with the same log-probabilities; drafts were accepted and rejected."""
    m, tok = model
    before = health(draft_server)
    for prompt in ["the king and the queen", "thou art my love", "Love.", "my lord the night is"]:
        kw = {"temperature": 0, "logprobs": 1, "x_routing": True}
        plain, drafted = completion(server, prompt, 40, **kw), completion(draft_server, prompt, 40, **kw)
        ids = [[t["id"] for t in r["choices"][0]["x_routing"]] for r in (plain, drafted)]
        assert ids[1] == ids[0] == greedy_ids(model, tok.encode(prompt, bos=True), 40)
        assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
        torch.testing.assert_close(torch.tensor(drafted["choices"][0]["logprobs"]["token_logprobs"]),
                                   torch.tensor(plain["choices"][0]["logprobs"]["token_logprobs"]), atol=5e-6, rtol=0)
    after = health(draft_server)
    accepted, drafted = after["accepted"] - before["accepted"], after["drafted"] - before["drafted"]
    assert after["draft"] == "mtp" and 0 < accepted < drafted  # both verdicts ("Love.": every draft rejected)


def test_draft_eight_concurrent_clients_equal_single_clients(server, draft_server, model):
    """8 clients at once on the drafting server (arriving while others are mid-generation, so rows of one batch
    accept different numbers of drafts): greedy clients get exactly the non-drafting server's tokens, seeded
    sampling clients exactly `generate(draft='mtp', seed=...)`'s (notebook 28's speculative sampling, per row)."""
    tok = model[1]
    words = "the king queen lord lady sword crown night".split()
    prompts = [" ".join(words[i:] + words[:i][: i % 3]) for i in range(8)]

    def ask(srv, i, delay=0.0):
        time.sleep(delay)
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": i}
        r = completion(srv, prompts[i], 24 + 4 * i, x_routing=True, x_draft=True, **sampling)["choices"][0]
        return [t["id"] for t in r["x_routing"]], r["x_draft"]

    steps0 = health(draft_server)["steps"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, [draft_server] * 8, range(8), [0.03 * i for i in range(8)]))
    for i, (ids, _) in enumerate(together):
        prompt = tok.encode(prompts[i], bos=True)
        want = ask(server, i)[0] if i % 2 == 0 else greedy_ids(model, prompt, 24 + 4 * i, temperature=1.0, seed=i,
                                                               draft="mtp")
        assert ids == want, i
    assert health(draft_server)["steps"] - steps0 < sum(len(x[0]) for x in together)  # rows shared steps
    accepted = [sum(flags) for _, flags in together]
    assert len(set(accepted)) > 1 and max(accepted) > 0, accepted  # rows accepted different numbers of drafts


def test_x_draft_flags_agree_with_usage(server, draft_server):
    """Streamed with `x_draft`: one flag per token, as many true flags as `usage.x_draft.accepted`; each verified
    draft gives one token plus a second when accepted (tokens = 1 + drafted + accepted, less the bonus of an accepted
    last token, never sent); the same flags without streaming. Without the opt-in no field; a server that does not draft flags nothing."""
    counts = []
    for prompt, sampling in [("Love.", {"temperature": 0}), ("the king and the queen", {"temperature": 1.5, "seed": 3})]:
        body = {"prompt": prompt, "max_tokens": 60, "x_draft": True, **sampling}
        with httpx.stream("POST", draft_server["url"] + "/v1/completions", timeout=120,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
        flags = [f for c in chunks for ch in c["choices"] for f in ch.get("x_draft", [])]
        usage = chunks[-1]["usage"]
        assert len(flags) == usage["completion_tokens"] and sum(flags) == usage["x_draft"]["accepted"]
        d = usage["x_draft"]
        assert usage["completion_tokens"] == 1 + d["drafted"] + d["accepted"] - flags[-1]  # an accepted last draft
        whole = completion(draft_server, prompt, 60, x_draft=True, **sampling)
        assert whole["choices"][0]["x_draft"] == flags and whole["usage"]["x_draft"] == d
        counts.append(d)
    assert sum(d["accepted"] for d in counts) > 0 and all(d["accepted"] < d["drafted"] for d in counts), counts
    plain = completion(draft_server, "the queen", 5, temperature=0)
    assert "x_draft" not in plain["choices"][0] and "x_draft" not in plain["usage"]
    off = completion(server, "the queen", 5, temperature=0, x_draft=True)
    assert not any(off["choices"][0]["x_draft"]) and off["usage"]["x_draft"] == {"drafted": 0, "accepted": 0}


def test_draft_mtp_without_an_mtp_module_is_one_error_line(tiny_corpus, tmp_path, capsys):
    """`serve --draft mtp` on a checkpoint trained without MTP (num_nextn_predict_layers=0): one `dsv3: error:` line
    naming MTP, exit 2, no server."""
    out = tmp_path / "no-mtp"
    assert main(["train", "--corpus", str(tiny_corpus), "--no-progress", "--out", str(out), "--max-steps", "1",
                 "--set", *TINY_SET, "num_nextn_predict_layers=0"]) == 0
    capsys.readouterr()
    assert main(["serve", "--ckpt", str(out), "--draft", "mtp", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3: error:") and "MTP" in err[0], err


def test_client_disconnect_frees_the_slot(server):
    """A client that goes away mid-stream ends its generation ('cancelled') and its row is free again."""
    before = health(server)
    with httpx.stream("POST", server["url"] + "/v1/completions",
                      json={"prompt": "the", "max_tokens": 400, "stream": True, "temperature": 1, "seed": 1}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert got[0].startswith("data: ")
    t0 = time.time()
    while (h := health(server))["busy"] or h["cancelled"] == before["cancelled"]:
        assert time.time() - t0 < 30, h
        time.sleep(0.05)
    assert h["cancelled"] == before["cancelled"] + 1 and h["length"] == before["length"]


def test_page_is_served_without_path_traversal(server):
    """`/` is the demo page; no request path reaches another file."""
    page = httpx.get(server["url"] + "/")
    assert page.status_code == 200 and "x_routing" in page.text
    for path in ["/../pyproject.toml", "/static/../../pyproject.toml", "/%2e%2e/%2e%2e/pyproject.toml",
                 "/static/index.html/../../__init__.py", "/..%2f..%2fpyproject.toml"]:
        r = httpx.get(server["url"] + path)
        assert r.status_code == 404 and "[project]" not in r.text, path


def _arc_task(root, n):
    """lm-eval's own arc_easy YAML, pointed at the first `n` items of the local Arrow file (nothing downloaded)."""
    from pathlib import Path

    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from dsv3_min.tasks import TASKS, load_split
    t = TASKS["arc_easy"]
    datasets.Dataset.from_list(load_split(t.source, t.split)[:n]).save_to_disk(str(root / "arc"))
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml")
    cfg.update(dataset_path="arrow", dataset_name=None, training_split=None, validation_split=None,
               dataset_kwargs={"data_files": {t.split: str(root / "arc" / "data-00000-of-00001.arrow")}},
               test_split=t.split)
    return ConfigurableTask(config=cfg)


def test_lm_eval_local_completions_equals_dsv3_eval(server, run, tmp_path):
    """lm-eval's `local-completions` model pointed at the server scores the first 50 ARC-Easy items with the same
    accuracy (and the same per-item log-likelihoods, to 1e-3) as `python -m dsv3_min eval`."""
    from conftest import require_eval_data
    require_eval_data()
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path / "hf_cache")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    n = 50
    assert main(["eval", "--ckpt", str(run), "--tasks", "arc_easy", "--limit", str(n), "--out",
                 str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["results"]["arc_easy"]
    task = _arc_task(tmp_path, n)
    task.build_all_requests(limit=n)
    insts = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    lm = LocalCompletionsAPI(base_url=server["url"] + "/v1/completions", model=server["name"],
                             tokenizer_backend="huggingface", tokenizer=str(next(run.glob("ckpt-*")) / "tokenizer"),
                             add_bos_token=True, max_length=CTX + 1, max_retries=1)
    theirs = lm.loglikelihood(insts)
    docs = {i.doc_id: i.doc for i in insts}
    accs = [task.process_results(docs[d], [r for i, r in zip(insts, theirs) if i.doc_id == d])["acc"]
            for d in sorted(docs)]
    assert len(accs) == n
    assert sum(accs) / n == pytest.approx(ours["acc,none"], abs=1e-9)


@contextlib.contextmanager
def chromium_page(url):
    """Debian's headless Chromium, driven by Selenium through chromedriver, on the page at `url`."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1150,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
    try:
        drv.get(url + "/")
        WebDriverWait(drv, 60).until(lambda d: "MoE layers" in d.find_element(By.ID, "status").text)
        yield drv
    finally:
        drv.quit()


def generate_on_page(drv, settings: dict) -> None:
    """Fill the page's fields, press Generate and wait until the stream is done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    for k, v in settings.items():
        el = drv.find_element(By.ID, k)
        el.clear()
        el.send_keys(v)
    drv.find_element(By.ID, "go").click()
    WebDriverWait(drv, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1")


def test_browser_page_streams_and_shows_the_routing_of_a_token(server, tmp_path):
    """Headless Chromium (Debian's, driven by Selenium through chromedriver): load the page, generate, hover a token;
    the grid shows exactly that token's experts per MoE layer as the API returns them; save a screenshot."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dsv3_min.files import atomic_write
    with chromium_page(server["url"]) as drv:
        wait = WebDriverWait(drv, 60)
        generate_on_page(drv, {"prompt": "the king", "max_tokens": "24", "temperature": "1", "seed": "5"})
        assert not drv.find_element(By.ID, "draftlegend").is_displayed()  # no drafting, no legend
        spans = drv.find_elements(By.CSS_SELECTOR, "#out .tok")
        api = httpx.post(server["url"] + "/v1/completions", json={"prompt": "the king", "max_tokens": 24, "seed": 5,
                                                                  "temperature": 1, "x_routing": True}).json()
        routes = api["choices"][0]["x_routing"]
        assert len(spans) == len(routes) >= 4
        key = lambda j: (routes[j]["id"], routes[j]["experts"])
        k = next(j for j in range(1, len(routes) - 1) if key(j) not in (key(j - 1), key(j + 1)))  # unlike its neighbours
        ActionChains(drv).move_to_element(spans[k]).perform()
        wait.until(lambda d: f"(id {routes[k]['id']})" in d.find_element(By.ID, "gridtitle").text)
        cells = drv.find_elements(By.CSS_SELECTOR, "#grid td.on")
        shown = {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-expert"))): float(
            c.get_attribute("data-weight")) for c in cells}
        layers = json.loads(httpx.get(server["url"] + "/v1/models").text)["data"][0]["x_moe"]["layers"]
        want = {(layer, e): w for layer, es, ws in zip(layers, routes[k]["experts"], routes[k]["weights"])
                for e, w in zip(es, ws)}
        assert shown.keys() == want.keys()
        assert all(abs(shown[k] - want[k]) < 1e-3 for k in want)
        png = drv.get_screenshot_as_png()
    atomic_write(tmp_path / "serve_page.png", png)
    if os.environ.get("DSV3_SERVE_SCREENSHOT"):
        atomic_write(os.environ["DSV3_SERVE_SCREENSHOT"], png)


def test_browser_page_highlights_accepted_drafts(draft_server, tmp_path):
    """Headless Chromium on the `--draft mtp` server: the page asks for `x_draft`, gives exactly the tokens the API
    flags as accepted drafts the `draft` class (at least one here), shows the legend and the acceptance rate of the
    usage counts; a server without drafting shows no legend (the other browser test)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from dsv3_min.files import atomic_write
    with chromium_page(draft_server["url"]) as drv:
        assert "drafting with mtp" in drv.find_element(By.ID, "status").text
        generate_on_page(drv, {"prompt": "the king", "max_tokens": "40", "temperature": "0.7", "seed": "5"})
        spans = drv.find_elements(By.CSS_SELECTOR, "#out .tok")
        shown = ["draft" in s.get_attribute("class").split() for s in spans]
        legend, rate = drv.find_element(By.ID, "draftlegend"), drv.find_element(By.ID, "acceptance")
        assert legend.is_displayed()
        api = completion(draft_server, "the king", 40, temperature=0.7, seed=5, x_draft=True)
        flags, d = api["choices"][0]["x_draft"], api["usage"]["x_draft"]
        assert shown == flags and sum(flags) >= 1
        assert (rate.get_attribute("data-accepted"), rate.get_attribute("data-drafted")) == (str(d["accepted"]),
                                                                                               str(d["drafted"]))
        assert f"acceptance {100 * d['accepted'] / d['drafted']:.0f}% ({d['accepted']} of {d['drafted']} drafts)" \
            == rate.text
        ActionChains(drv).move_to_element(spans[shown.index(True)]).perform()  # the grid of a drafted token
        png = drv.get_screenshot_as_png()
    atomic_write(tmp_path / "serve_page_draft.png", png)
