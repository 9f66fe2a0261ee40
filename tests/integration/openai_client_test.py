"""The OpenAI front door, driven by the real `openai` Python SDK against `moeserve serve`.

Usage: openai_client_test.py MOESERVE_BINARY     (run with the venv of scripts/python-venv.sh)
"""
import json
import signal
import sys
import time
import urllib.error
import urllib.request

import openai

from moeserve_process import Server, Tally

MODEL = "builtin:tiny"


def expect_error(error_type, status, call):
    try:
        call()
    except error_type as error:
        assert error.status_code == status, (error.status_code, error)
        return error
    raise AssertionError(f"expected {error_type.__name__} ({status})")


def check_models(client):
    models = [m.id for m in client.models.list()]
    assert models == [MODEL], models
    assert client.models.retrieve(MODEL).id == MODEL


def check_completion(client):
    response = client.completions.create(model=MODEL, prompt="hello", max_tokens=8,
                                         temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "length", choice
    assert response.usage.completion_tokens == 8, response.usage
    # builtin:tiny's byte tokenizer: one token per byte plus <bos>.
    assert response.usage.prompt_tokens == len("hello") + 1, response.usage
    assert response.object == "text_completion" and response.id.startswith("cmpl-")


def check_completion_stream_matches(client):
    whole = client.completions.create(model=MODEL, prompt="stream me", max_tokens=12,
                                      temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="stream me", max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole, (text, whole)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    # The last chunk carries the usage and no choices.
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12, chunks[-1]
    assert all(c.usage is None for c in chunks[:-1])


def check_token_id_prompt(client):
    by_text = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0)
    # <bos> is 256 in builtin:tiny; "abc" is bytes 97, 98, 99.
    by_ids = client.completions.create(model=MODEL, prompt=[256, 97, 98, 99], max_tokens=6,
                                       temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text


def check_chat(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi"}],
        max_tokens=5, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # The built-in template: "<|role|>\ncontent\n" per message, then "<|assistant|>\n"; <bos>.
    rendered = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert response.usage.prompt_tokens == len(rendered) + 1, response.usage
    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi"}],
        max_tokens=5, temperature=0, stream=True)
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content, (text, choice.message.content)
    assert chunks[-1].choices[0].finish_reason == "length"


def check_max_completion_tokens_and_default(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=3)
    assert response.usage.completion_tokens <= 3
    response = client.completions.create(model=MODEL, prompt="x", temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16  # OpenAI's default for completions


def check_seeds(client):
    def sample(seed):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=16,
            temperature=1.0, top_p=0.95, seed=seed,
            extra_body={"ignore_eos": True}).choices[0].message.content
    first, again, other = sample(7), sample(7), sample(8)
    assert first == again, (first, again)
    assert first != other, "different seeds gave the same 16 sampled tokens"


def check_n(client):
    response = client.completions.create(model=MODEL, prompt="many", max_tokens=8,
                                         temperature=1.0, seed=3, n=3,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.text for c in response.choices}) > 1, "n choices were all the same"
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens == len("many") + 1  # the prompt counts once
    chunks = list(client.completions.create(model=MODEL, prompt="many", max_tokens=8,
                                            temperature=1.0, seed=3, n=3, stream=True,
                                            extra_body={"ignore_eos": True}))
    for index in range(3):
        text = "".join(c.choices[0].text for c in chunks if c.choices[0].index == index)
        assert text == response.choices[index].text, index
    batched = client.completions.create(model=MODEL, prompt=["one", "two"], max_tokens=4,
                                        temperature=0)
    assert len(batched.choices) == 2


def check_stop_strings(client):
    prompt = "stop strings"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48,
                                      temperature=0, extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    # A two-character ASCII stop string taken from the greedy text, past its first character.
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1)
                if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    expected = text[:text.index(stop)]
    for stream in (False, True):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=48,
                                             temperature=0, stop=[stop, "never seen"],
                                             stream=stream)
        if stream:
            chunks = list(response)
            got = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = response.choices[0].text, response.choices[0].finish_reason
        assert got == expected and finish == "stop", (stream, stop, got, expected, finish)


def check_errors(client):
    error = expect_error(openai.NotFoundError, 404, lambda: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]))
    assert "builtin:tiny" in error.message
    assert error.body["type"] == "invalid_request_error" and error.body["code"] == "model_not_found"
    expect_error(openai.BadRequestError, 400, lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=0))
    expect_error(openai.BadRequestError, 400, lambda: client.completions.create(
        model=MODEL, prompt="x", temperature=5))
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=MODEL, messages=[]))
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], logprobs=True))
    # Prompt + max_tokens beyond the context: the engine's message says what to lower.
    error = expect_error(openai.BadRequestError, 400, lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=10**6))
    assert "context length" in error.message, error.message
    expect_error(openai.BadRequestError, 400, lambda: client.completions.create(
        model=MODEL, prompt="x", extra_body={"n": 0}))


def raw_post(base_url, path, body):
    request = urllib.request.Request(base_url + path, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def check_wire_format(server):
    status, _, body = raw_post(server.http_url, "/v1/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error", body
    status, _, body = raw_post(server.http_url, "/v1/nowhere", b"{}")
    assert status == 404 and "error" in json.loads(body), body
    status, headers, body = raw_post(
        server.http_url, "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3, "stream": True}).encode())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]", events[-1]
    with urllib.request.urlopen(server.http_url + "/health", timeout=10) as response:
        assert response.status == 200


def check_stream_disconnect_cancels(server, client):
    assert server.wait_idle(30), "the server was busy before the test"
    stream = client.completions.create(model=MODEL, prompt="long", max_tokens=3000,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for received, _ in enumerate(stream):
        if received == 3:
            break
    assert server.metric("moeserve_running_requests") == 1
    stream.close()  # the SDK closes the connection
    # 3000 tokens at --min-step-ms 2 would take 6 s or more; a cancelled request ends at once.
    assert server.wait_idle(3), "a closed stream kept its request (and KV blocks)"


def check_non_stream_disconnect_cancels(server, client):
    assert server.wait_idle(30), "the server was busy before the test"
    impatient = client.with_options(timeout=0.5)
    try:
        impatient.completions.create(model=MODEL, prompt="long", max_tokens=3000,
                                     temperature=0, extra_body={"ignore_eos": True})
        raise AssertionError("the request finished before the client's timeout")
    except openai.APITimeoutError:
        pass
    assert server.wait_idle(3), "a client that gave up kept its request (and KV blocks)"


def check_queue_full(binary):
    server = Server(binary, "--max-running-requests", "1", "--max-queue", "1",
                    "--min-step-ms", "5")
    try:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)
        streams = []
        # One running, one waiting, then the queue is full. The first stream's first token
        # shows it left the queue before the second comes: on a loaded machine the scheduler
        # may not have taken it yet when the second arrives, and the queue of one would be full.
        for _ in range(2):
            stream = client.completions.create(model=MODEL, prompt="x", max_tokens=2000,
                                               stream=True, extra_body={"ignore_eos": True})
            streams.append(stream)
            if len(streams) == 1:
                next(iter(stream))
        error = expect_error(openai.RateLimitError, 429, lambda: client.completions.create(
            model=MODEL, prompt="x", max_tokens=4))
        assert error.body["type"] == "rate_limit_error", error.body
        for stream in streams:
            stream.close()
        client.close()
    finally:
        server.stop()


def check_group_failure(binary):
    # Rank 0 of the one group fails at its 20th working step.
    server = Server(binary, "--inject-fault", "mixed:0:20", "--min-step-ms", "2")
    try:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model=MODEL, prompt="x", max_tokens=200,
                                           stream=True, extra_body={"ignore_eos": True})
        try:
            for _ in stream:
                pass
            raise AssertionError("the stream ended normally through a group failure")
        except openai.APIError as error:
            assert "mixed" in str(error), error  # the error event names the failed group
        expect_error(openai.InternalServerError, 503, lambda: client.completions.create(
            model=MODEL, prompt="x", max_tokens=4))
        try:
            urllib.request.urlopen(server.http_url + "/health", timeout=10)
            raise AssertionError("/health answered 200 after a group failure")
        except urllib.error.HTTPError as error:
            assert error.code == 503
        client.close()
    finally:
        server.stop()


def check_sigterm_drains(binary):
    server = Server(binary, "--min-step-ms", "2")
    try:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)
        stream = iter(client.completions.create(model=MODEL, prompt="drain", max_tokens=300,
                                                stream=True, extra_body={"ignore_eos": True}))
        chunks = [next(stream)]
        server.process.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while not any("received SIGTERM" in line for line in server.output):
            assert time.time() < deadline, "the server did not log the SIGTERM"
            time.sleep(0.01)
        # New requests are refused while the one in flight finishes.
        expect_error(openai.InternalServerError, 503, lambda: client.completions.create(
            model=MODEL, prompt="late", max_tokens=2))
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length", chunks[-1]
        assert len(chunks) == 300, len(chunks)
        client.close()
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def check_sigterm_past_grace(binary):
    # A stream still running when the grace period ends gets a 503 error event, and the server
    # exits instead of waiting for it.
    server = Server(binary, "--min-step-ms", "2", "--shutdown-grace-seconds", "0.3")
    try:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)
        stream = iter(client.completions.create(model=MODEL, prompt="long", max_tokens=3000,
                                                stream=True, extra_body={"ignore_eos": True}))
        next(stream)
        server.process.send_signal(signal.SIGTERM)
        try:
            for _ in stream:
                pass
            raise AssertionError("the stream finished 3000 tokens within a 0.3 s grace")
        except openai.APIError as error:
            assert "stopped" in str(error), error
        client.close()
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def main():
    binary = sys.argv[1]
    tally = Tally()
    # Steps of at least 2 ms keep long requests in flight long enough to cancel them.
    server = Server(binary, "--min-step-ms", "2")
    try:
        client = openai.OpenAI(base_url=server.http_url + "/v1", api_key="none", max_retries=0)
        tally.run("models", check_models, client)
        tally.run("completion", check_completion, client)
        tally.run("completion stream equals non-stream", check_completion_stream_matches, client)
        tally.run("token id prompt", check_token_id_prompt, client)
        tally.run("chat (template, stream)", check_chat, client)
        tally.run("max_completion_tokens, defaults", check_max_completion_tokens_and_default,
                  client)
        tally.run("seeds", check_seeds, client)
        tally.run("n choices and batched prompts", check_n, client)
        tally.run("stop strings", check_stop_strings, client)
        tally.run("errors", check_errors, client)
        tally.run("wire format", check_wire_format, server)
        tally.run("stream disconnect cancels", check_stream_disconnect_cancels, server, client)
        tally.run("non-stream disconnect cancels", check_non_stream_disconnect_cancels, server,
                  client)
        client.close()
    finally:
        server.stop()
    tally.run("429 when the queue is full", check_queue_full, binary)
    tally.run("503 after a group failure", check_group_failure, binary)
    tally.run("SIGTERM drains streams in flight", check_sigterm_drains, binary)
    tally.run("SIGTERM past the grace period", check_sigterm_past_grace, binary)
    return tally.finish()


if __name__ == "__main__":
    sys.exit(main())
