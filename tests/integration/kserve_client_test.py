"""The KServe v2 / Triton front door, driven by the real `tritonclient[grpc]` against
`moeserve serve` (same gRPC port as moeserve.v1.Generation).

Usage: kserve_client_test.py MOESERVE_BINARY     (run with the venv of scripts/python-venv.sh)
"""
import json
import queue
import sys
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from moeserve_process import Server, Tally

MODEL = "builtin:tiny"


def tensor(name, datatype, values):
    array = np.array(values, dtype=object if datatype == "BYTES" else None)
    if datatype == "INT32":
        array = array.astype(np.int32)
    if datatype == "UINT64":
        array = array.astype(np.uint64)
    if datatype == "FP32":
        array = array.astype(np.float32)
    entry = grpcclient.InferInput(name, list(array.shape), datatype)
    entry.set_data_from_numpy(array)
    return entry


def generation(prompt, max_tokens, stream=False, **extra):
    inputs = [tensor("text_input", "BYTES", [prompt.encode()]),
              tensor("max_tokens", "INT32", [max_tokens]),
              tensor("stream", "BOOL", [stream])]
    for name, (datatype, value) in extra.items():
        inputs.append(tensor(name, datatype, value))
    return inputs


def text_of(result):
    return result.as_numpy("text_output")[0].decode()


def expect_status(code, call):
    try:
        call()
    except InferenceServerException as error:
        assert error.status() == f"StatusCode.{code}", (error.status(), error.message())
        return error
    raise AssertionError(f"expected {code}")


def check_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("other-model")
    server = client.get_server_metadata()
    assert server.name == "moeserve" and server.version, server
    model = client.get_model_metadata(MODEL)
    assert model.name == MODEL and list(model.versions) == ["1"], model
    inputs = {t.name: t.datatype for t in model.inputs}
    assert inputs["text_input"] == "BYTES" and inputs["max_tokens"] == "INT32", inputs
    assert inputs["stream"] == "BOOL", inputs
    assert [(t.name, t.datatype) for t in model.outputs] == [("text_output", "BYTES")]
    expect_status("NOT_FOUND", lambda: client.get_model_metadata("other-model"))


def check_infer(client, http_url):
    result = client.infer(MODEL, generation("hello", 8, temperature=("FP32", [0.0])))
    parameters = result.get_response().parameters
    assert parameters["finish_reason"].string_param == "length", parameters
    assert parameters["completion_tokens"].int64_param == 8, parameters
    assert parameters["prompt_tokens"].int64_param == len("hello") + 1, parameters
    # The same greedy generation through the OpenAI front door gives the same text.
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 8,
                       "temperature": 0}).encode()
    request = urllib.request.Request(http_url + "/v1/completions", data=body)
    with urllib.request.urlopen(request, timeout=60) as response:
        openai_text = json.loads(response.read())["choices"][0]["text"]
    assert text_of(result) == openai_text, (text_of(result), openai_text)


def check_stream(client):
    whole = text_of(client.infer(MODEL, generation("stream it", 10)))
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, generation("stream it", 10, stream=True),
                                  request_id="streamed")
        pieces, finals = [], []
        while not finals or not finals[-1]:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "streamed"
            pieces.append(text_of(result))
            finals.append(response.parameters["triton_final_response"].bool_param)
        # Token by token: one response per generated token, the last one flagged.
        assert len(pieces) == 10 and finals == [False] * 9 + [True], (pieces, finals)
        assert "".join(pieces) == whole, (pieces, whole)

        # Two requests in flight on one stream, then an error for a third: each is answered.
        client.async_stream_infer(MODEL, generation("first", 4, stream=True), request_id="a")
        client.async_stream_infer(MODEL, generation("second", 4, stream=False), request_id="b")
        client.async_stream_infer(MODEL, generation("third", 0, stream=True), request_id="c")
        done, errors = set(), []
        while len(done) + len(errors) < 3:
            result, error = responses.get(timeout=60)
            if error is not None:
                errors.append(error)
                continue
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                done.add(response.id)
        assert done == {"a", "b"}, done
        assert len(errors) == 1 and "max_tokens" in errors[0].message(), errors

        # Triton's option of an empty response after the last one.
        client.async_stream_infer(MODEL, generation("empty final", 2, stream=True),
                                  request_id="e", enable_empty_final_response=True)
        flags, empty_last = [], False
        while not flags or not flags[-1]:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            flags.append(response.parameters["triton_final_response"].bool_param)
            empty_last = len(response.outputs) == 0
        assert flags == [False, False, True] and empty_last, flags
    finally:
        client.stop_stream()


def check_sampling(client):
    def sample(seed):
        return text_of(client.infer(MODEL, generation(
            "sample", 12, temperature=("FP32", [1.0]), random_seed=("UINT64", [seed]),
            ignore_eos=("BOOL", [True]))))
    assert sample(5) == sample(5)
    assert sample(5) != sample(6)
    # vLLM-style sampling_parameters and stop_words.
    whole = text_of(client.infer(MODEL, generation("stops", 32, ignore_eos=("BOOL", [True]))))
    stop = next(whole[i:i + 2] for i in range(1, len(whole) - 1)
                if whole[i:i + 2].isascii() and whole[i:i + 2].isprintable())
    stopped = client.infer(MODEL, generation("stops", 32, stop_words=("BYTES", [stop.encode()])))
    assert text_of(stopped) == whole[:whole.index(stop)], (stop, text_of(stopped))
    assert stopped.get_response().parameters["finish_reason"].string_param == "stop"
    parameters = json.dumps({"max_tokens": 3, "temperature": 0, "ignore_eos": True})
    result = client.infer(MODEL, [tensor("text_input", "BYTES", [b"json"]),
                                  tensor("sampling_parameters", "BYTES", [parameters.encode()])])
    assert result.get_response().parameters["completion_tokens"].int64_param == 3


def check_errors(client):
    expect_status("NOT_FOUND", lambda: client.infer("other-model", generation("x", 4)))
    error = expect_status("INVALID_ARGUMENT", lambda: client.infer(
        MODEL, generation("x", 4) + [tensor("bogus", "INT32", [1])]))
    assert "bogus" in error.message()
    expect_status("INVALID_ARGUMENT", lambda: client.infer(MODEL, generation("x", 4, stream=True)))
    expect_status("INVALID_ARGUMENT", lambda: client.infer(MODEL, generation("x", 0)))
    expect_status("INVALID_ARGUMENT", lambda: client.infer(
        MODEL, [tensor("text_input", "BYTES", [b"two", b"prompts"])]))
    expect_status("INVALID_ARGUMENT", lambda: client.infer(
        MODEL, [tensor("text_input", "INT32", [1])]))
    expect_status("INVALID_ARGUMENT", lambda: client.infer(MODEL, [tensor("max_tokens", "INT32",
                                                                          [4])]))


def check_cancel(server, client):
    long_generation = generation("long", 3000, ignore_eos=("BOOL", [True]))
    # A ModelInfer client that gives up: 3000 tokens at --min-step-ms 2 take 6 s or more.
    assert server.wait_idle(30), "the server was busy before the test"
    expect_status("DEADLINE_EXCEEDED", lambda: client.infer(MODEL, long_generation,
                                                             client_timeout=0.5))
    assert server.wait_idle(3), "an abandoned ModelInfer kept its request (and KV blocks)"
    # A stream cancelled mid-generation.
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, generation("long", 3000, stream=True,
                                                ignore_eos=("BOOL", [True])))
    for _ in range(3):
        result, error = responses.get(timeout=60)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    assert server.wait_idle(3), "a cancelled stream kept its request (and KV blocks)"


def main():
    binary = sys.argv[1]
    tally = Tally()
    # Steps of at least 2 ms keep long requests in flight long enough to cancel them.
    server = Server(binary, "--min-step-ms", "2")
    try:
        client = grpcclient.InferenceServerClient(server.grpc_address)
        tally.run("health and metadata", check_health_and_metadata, client)
        tally.run("infer (same text as OpenAI)", check_infer, client, server.http_url)
        tally.run("decoupled streaming", check_stream, client)
        tally.run("sampling, seeds, stop words", check_sampling, client)
        tally.run("errors", check_errors, client)
        tally.run("cancel frees the request", check_cancel, server, client)
        client.close()
    finally:
        server.stop()
    return tally.finish()


if __name__ == "__main__":
    sys.exit(main())
