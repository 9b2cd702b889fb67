"""What kdkit does with a server that answers something other than vLLM's API: one line naming the URL, the
endpoint and what was missing, never a traceback (a small fake server per malformed answer)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.demo.run import TEACHER_DIR
from kdkit.teacher.served import ServedError, Server, server_root

MODELS = {"data": [{"id": "m", "root": "/models/m", "max_model_len": 128}]}
GOOD = {"/v1/models": MODELS, "/version": {"version": "0.32.0"}, "/tokenize": {"tokens": [5, 6, 7]},
        "/v1/completions": {"choices": [{"index": 0, "prompt_logprobs": [None, {"token_id:6": {"logprob": -0.1,
                                                                                              "rank": 1}}],
                                         "logprobs": {"tokens": ["token_id:9", "token_id:2"]}}]}}
HTML = b"<html><body>502 Bad Gateway</body></html>"


class Cut(bytes):
    """An answer whose connection closes before the length its header announced."""


@pytest.fixture
def fake():
    """A server answering ``answers[path]`` (a JSON value, or bytes sent as they are, as text/html) to GET and
    POST."""
    answers: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path not in answers:
                self.send_response(404)
                self.end_headers()
                return
            body = answers[self.path]
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            cut = isinstance(body, Cut)  # a server that dies mid-answer: fewer bytes than it announced
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if isinstance(body, bytes) else "application/json")
            self.send_header("Content-Length", str(len(raw) + 1000 if cut else len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = _answer

        def log_message(self, *a) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)  # shutdown waits one poll
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", answers
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("given", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                                   " http://h:8000/v1 "])
def test_the_root_and_the_openai_base_url_name_one_server(given):
    assert server_root(given) == "http://h:8000" and Server(given).url == "http://h:8000"
    assert server_root("http://proxy/vllm/v1") == "http://proxy/vllm"  # a path prefix stays


def test_a_url_without_a_scheme_is_refused():
    with pytest.raises(ServedError, match="expected http://HOST:PORT or http://HOST:PORT/v1"):
        Server("localhost:8000")


def test_the_good_answers_parse(fake):
    url, answers = fake
    answers.update(GOOD)
    s = Server(url + "/v1", retries=0)
    assert s.info()["model"] == "m" and s.info()["vllm_version"] == "0.32.0"
    assert s.tokenize("x") == [5, 6, 7]
    assert s.generate([[1, 2]], 4, 0.0, 1.0, 0, [2]) == [[9, 2]]
    assert s.token_logprobs([[5, 6]])[0].tolist() == pytest.approx([-0.1])


CALLS = {"info": lambda s: s.info(), "tokenize": lambda s: s.tokenize("x"),
         "prompt_topk": lambda s: s.prompt_topk([[5, 6]], 1), "token_logprobs": lambda s: s.token_logprobs([[5, 6]]),
         "generate": lambda s: s.generate([[1, 2]], 4, 0.0, 1.0, 0, [2])}
COMPLETION = GOOD["/v1/completions"]["choices"][0]
# (what kdkit calls, the endpoint, the malformed answer, what the message must say)
MALFORMED = [
    ("info", "/v1/models", "a json string", "answered with a JSON string"),
    ("info", "/v1/models", HTML, "answered with text starting '<html>"),
    ("info", "/v1/models", {"object": "list"}, "answered without 'data'"),
    ("info", "/v1/models", {"data": [{"name": "m"}]}, "its model list is not what vLLM returns (no 'id')"),
    ("info", "/v1/models", {"data": "m"}, "its model list is not what vLLM returns"),
    ("tokenize", "/tokenize", {"ids": [1]}, "answered without 'tokens'"),
    ("tokenize", "/tokenize", {"tokens": ["a", "b"]}, "its tokens is not what vLLM returns"),
    ("tokenize", "/tokenize", ["tokens"], "answered with a JSON list"),
    ("prompt_topk", "/v1/completions", {"id": "x"}, "answered without 'choices'"),
    ("prompt_topk", "/v1/completions", HTML, "answered with text starting '<html>"),
    ("prompt_topk", "/v1/completions", {"choices": ["text"]}, "its choices is not what vLLM returns"),
    ("prompt_topk", "/v1/completions", {"choices": [{**COMPLETION, "prompt_logprobs": [None, {"token_id:6": -0.1}]}]},
     "its prompt_logprobs is not what vLLM returns"),
    ("prompt_topk", "/v1/completions", {"choices": [{**COMPLETION, "prompt_logprobs": [None, ["x"]]}]},
     "its prompt_logprobs is not what vLLM returns"),
    ("token_logprobs", "/v1/completions", {"choices": [{**COMPLETION, "prompt_logprobs": [None, {"6": {}}]}]},
     "its prompt_logprobs is not what vLLM returns (no 'logprob')"),
    ("generate", "/v1/completions", {"choices": [{"index": 0, "logprobs": {"text_offset": []}}]},
     "its logprobs.tokens is not what vLLM returns (no 'tokens')"),
    ("generate", "/v1/completions", {"choices": [{"index": 0, "logprobs": {"tokens": ["tok"]}}]},
     "its logprobs.tokens is not what vLLM returns"),
]


@pytest.mark.parametrize("call, path, answer, says", MALFORMED)
def test_a_malformed_answer_is_one_line_naming_the_url_the_endpoint_and_what_was_missing(fake, call, path, answer, says):
    url, answers = fake
    answers.update(GOOD)
    answers[path] = answer
    with pytest.raises(ServedError) as e:
        CALLS[call](Server(url, retries=0))
    msg = str(e.value)
    assert f"{url}{path}" in msg and says in msg and "\n" not in msg, msg


def test_the_cli_prints_it_without_a_traceback(fake, tmp_path):
    url, answers = fake
    answers.update(GOOD)
    answers["/v1/models"] = b"not json at all"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "hello"}) + "\n")
    res = CliRunner().invoke(app, ["teacher", "check", "--teacher-url", url + "/v1", "--teacher", str(TEACHER_DIR),
                                   "--data", str(rows)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"{url}/v1/models answered with text starting 'not json at all'" in res.output


def test_an_answer_cut_short_is_one_line_not_a_traceback(fake):
    """A server that dies while it answers (the connection ends before Content-Length bytes): http.client raises
    IncompleteRead, which is neither an OSError nor a URLError; it ends as the same one line as a refusal."""
    url, answers = fake
    answers.update(GOOD)
    answers["/v1/models"] = Cut(json.dumps(MODELS).encode())
    with pytest.raises(ServedError, match=r"did not answer /v1/models after 1 tries \(IncompleteRead: the answer "
                                          r"ended before it was whole\)"):
        Server(url, retries=0).info()
