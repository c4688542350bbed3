"""eval/judge.py against a local OpenAI-compatible server: answers, retries, cache, A/B order."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from safealign_jax.data.users import UserProfile
from safealign_jax.errors import UserError
from safealign_jax.eval.judge import Judge, JudgeSettings, Verdict, pass_rate, win_rate

USER = UserProfile(user_id="0000001", age=18, age_group="adolescents", gender="male", religion="Islam",
                   physical_condition="healthy", mental_condition="healthy",
                   banned=("Sexuality", "Propaganda"), allowed=("Hate", "Harassment", "Violence", "Self-Harm", "Shocking"))


class Server:
    """Replies with the queued (status, assistant text) items in order, then with `default`."""

    def __init__(self):
        self.queue, self.requests, self.default = [], [], (200, '{"pass": true, "reason": "fine"}')
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, self.headers.get("Authorization"), body))
                status, text = server.queue.pop(0) if server.queue else server.default
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.http.shutdown()


@pytest.fixture
def make_judge(server, tmp_path, monkeypatch):
    server.queue.clear()
    server.requests.clear()
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    sleeps = []

    def make(**overrides):
        settings = JudgeSettings(base_url=server.url, model="judge-model", api_key_env="JUDGE_TEST_KEY",
                                 attempts=3, backoff_s=0.5, timeout_s=5, **overrides)
        return Judge(settings, str(tmp_path / "cache"), sleep=sleeps.append)

    make.sleeps = sleeps
    return make


def image(value):
    return np.full((8, 8, 3), value, np.uint8)


def test_well_formed_answer_and_request_content(server, make_judge):
    server.queue.append((200, '```json\n{"pass": false, "reason": "nudity"}\n```'))
    verdict = make_judge().passes(image(10), "a prompt", USER)
    assert verdict == Verdict(value=False, reason="nudity")
    path, auth, body = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0.1
    content = body["messages"][1]["content"]
    assert "Banned categories: Sexuality" in content[0]["text"] and '"a prompt"' in content[0]["text"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_malformed_answers_are_retried_then_an_error(server, make_judge):
    judge = make_judge()
    server.queue += [(200, "yes it passes"), (200, '{"pass": "true", "reason": "x"}')]
    verdict = judge.passes(image(20), "p", USER)  # third answer (default) is well formed
    assert verdict.value is True and len(server.requests) == 3
    server.queue += [(200, "nope")] * 3
    verdict = judge.passes(image(21), "p", USER)
    assert verdict.value is None and "malformed answer" in verdict.error
    assert pass_rate([verdict, Verdict(True), Verdict(False)]) == {"pass_rate": 0.5, "n": 2, "errors": 1}


def test_http_errors_back_off_and_permanent_errors_stop(server, make_judge):
    judge = make_judge()
    server.queue += [(503, ""), (429, "")]
    assert judge.passes(image(30), "p", USER).value is True
    assert make_judge.sleeps == [0.5, 1.0] and len(server.requests) == 3
    server.queue += [(401, "")]
    verdict = judge.passes(image(31), "p", USER)
    assert verdict.value is None and "HTTP 401" in verdict.error and len(server.requests) == 4
    server.queue += [(500, "")] * 3
    verdict = judge.passes(image(32), "p", USER)
    assert "gave up after 3 attempts: HTTP 500" in verdict.error


def test_cache_answers_reruns_without_requests(server, make_judge):
    server.default = (200, '{"winner": "A", "reason": "safer"}')
    try:
        first = [make_judge().compare(image(i), image(100 + i), "p", USER, key=f"{i:05d}") for i in range(4)]
        sent = len(server.requests)
        again = [make_judge().compare(image(i), image(100 + i), "p", USER, key=f"{i:05d}") for i in range(4)]
    finally:
        server.default = (200, '{"pass": true, "reason": "fine"}')
    assert sent == 4 and len(server.requests) == 4
    assert all(v.cached for v in again) and [v.value for v in again] == [v.value for v in first]
    # "A" wins: the method when it was shown first, else the baseline
    assert [v.value for v in first] == ["method" if v.order == "method-first" else "baseline" for v in first]


def test_ab_order_is_deterministic_in_the_seed(make_judge):
    keys = [f"{i:05d}" for i in range(200)]
    order = [make_judge(seed=0).baseline_first(k) for k in keys]
    assert order == [make_judge(seed=0).baseline_first(k) for k in keys]
    assert order != [make_judge(seed=1).baseline_first(k) for k in keys]
    assert 70 < sum(order) < 130
    verdicts = [Verdict("method", order="baseline-first"), Verdict("tie"), Verdict("baseline"), Verdict(None, error="x")]
    assert win_rate(verdicts) == {"win_rate": 0.5, "wins": 1, "losses": 1, "ties": 1, "n": 3, "errors": 1, "baseline_first": 1}


def test_missing_key_is_a_user_error(server, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_JUDGE_KEY"):
        Judge(JudgeSettings(base_url=server.url, api_key_env="NO_SUCH_JUDGE_KEY"), str(tmp_path))
