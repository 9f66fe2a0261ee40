#include "server/kserve_service.h"

#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/build_info.h"
#include "nlohmann/json.hpp"
#include "server/status_conversion.h"

namespace moeserve::server {
namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(20);
constexpr char kVersion[] = "1";
// The response parameter Triton's decoupled streams flag each request's last response with.
constexpr char kFinalResponse[] = "triton_final_response";
// The request parameter asking for an empty response after the last one (Triton's option).
constexpr char kEmptyFinalResponse[] = "triton_enable_empty_final_response";

using InputTensor = inference::ModelInferRequest::InferInputTensor;

absl::Status Invalid(absl::string_view message) { return absl::InvalidArgumentError(message); }

// One input tensor with its raw bytes (when the request sent raw_input_contents).
struct Tensor {
  const InputTensor* tensor = nullptr;
  const std::string* raw = nullptr;

  const std::string& name() const { return tensor->name(); }
  const std::string& datatype() const { return tensor->datatype(); }

  int64_t ElementCount() const {
    int64_t count = 1;
    for (int64_t dimension : tensor->shape()) count *= dimension;
    return count;
  }

  absl::Status Mismatch(absl::string_view expected) const {
    return Invalid(
        absl::StrCat("input `", name(), "` has datatype ", datatype(), "; expected ", expected));
  }
};

// Little-endian fixed-width values from raw bytes.
template <typename T>
absl::StatusOr<std::vector<T>> RawValues(const Tensor& t) {
  if (t.raw->size() % sizeof(T) != 0) {
    return Invalid(absl::StrCat("input `", t.name(), "`: ", t.raw->size(),
                                " raw bytes do not divide into ", sizeof(T), "-byte elements"));
  }
  std::vector<T> values(t.raw->size() / sizeof(T));
  std::memcpy(values.data(), t.raw->data(), t.raw->size());  // x86-64 and arm64 are little-endian
  return values;
}

absl::StatusOr<std::vector<std::string>> BytesValues(const Tensor& t) {
  if (t.datatype() != "BYTES") return t.Mismatch("BYTES");
  if (t.raw == nullptr) {
    return std::vector<std::string>(t.tensor->contents().bytes_contents().begin(),
                                    t.tensor->contents().bytes_contents().end());
  }
  // Each element: a 4-byte little-endian length, then that many bytes.
  std::vector<std::string> values;
  size_t at = 0;
  while (at < t.raw->size()) {
    uint32_t length = 0;
    if (t.raw->size() - at < 4) {
      return Invalid(absl::StrCat("input `", t.name(), "`: truncated BYTES element length"));
    }
    std::memcpy(&length, t.raw->data() + at, 4);
    at += 4;
    if (t.raw->size() - at < length) {
      return Invalid(absl::StrCat("input `", t.name(), "`: BYTES element of ", length,
                                  " bytes runs past the end of the tensor"));
    }
    values.emplace_back(t.raw->substr(at, length));
    at += length;
  }
  return values;
}

absl::StatusOr<std::vector<int64_t>> IntegerValues(const Tensor& t) {
  const std::string& type = t.datatype();
  const auto& contents = t.tensor->contents();
  auto widen = [](const auto& values) {
    return std::vector<int64_t>(values.begin(), values.end());
  };
  if (t.raw == nullptr) {
    if (type == "INT8" || type == "INT16" || type == "INT32") return widen(contents.int_contents());
    if (type == "INT64") return widen(contents.int64_contents());
    if (type == "UINT8" || type == "UINT16" || type == "UINT32") {
      return widen(contents.uint_contents());
    }
    if (type == "UINT64") {
      std::vector<int64_t> values;
      for (uint64_t v : contents.uint64_contents()) {
        values.push_back(v > INT64_MAX ? INT64_MAX : static_cast<int64_t>(v));
      }
      return values;
    }
    return t.Mismatch("an integer type (INT8 .. INT64, UINT8 .. UINT64)");
  }
  auto raw = [&t, &widen]<typename T>(T) -> absl::StatusOr<std::vector<int64_t>> {
    absl::StatusOr<std::vector<T>> values = RawValues<T>(t);
    if (!values.ok()) return values.status();
    if constexpr (std::is_same_v<T, uint64_t>) {
      std::vector<int64_t> clamped;
      for (uint64_t v : *values) clamped.push_back(v > INT64_MAX ? INT64_MAX : int64_t(v));
      return clamped;
    } else {
      return widen(*values);
    }
  };
  if (type == "INT8") return raw(int8_t{});
  if (type == "INT16") return raw(int16_t{});
  if (type == "INT32") return raw(int32_t{});
  if (type == "INT64") return raw(int64_t{});
  if (type == "UINT8") return raw(uint8_t{});
  if (type == "UINT16") return raw(uint16_t{});
  if (type == "UINT32") return raw(uint32_t{});
  if (type == "UINT64") return raw(uint64_t{});
  return t.Mismatch("an integer type (INT8 .. INT64, UINT8 .. UINT64)");
}

absl::StatusOr<std::vector<double>> FloatValues(const Tensor& t) {
  const std::string& type = t.datatype();
  if (type == "FP32") {
    if (t.raw == nullptr) {
      return std::vector<double>(t.tensor->contents().fp32_contents().begin(),
                                 t.tensor->contents().fp32_contents().end());
    }
    absl::StatusOr<std::vector<float>> values = RawValues<float>(t);
    if (!values.ok()) return values.status();
    return std::vector<double>(values->begin(), values->end());
  }
  if (type == "FP64") {
    if (t.raw == nullptr) {
      return std::vector<double>(t.tensor->contents().fp64_contents().begin(),
                                 t.tensor->contents().fp64_contents().end());
    }
    return RawValues<double>(t);
  }
  return t.Mismatch("FP32 or FP64");
}

absl::StatusOr<std::vector<bool>> BoolValues(const Tensor& t) {
  if (t.datatype() != "BOOL") return t.Mismatch("BOOL");
  if (t.raw == nullptr) {
    return std::vector<bool>(t.tensor->contents().bool_contents().begin(),
                             t.tensor->contents().bool_contents().end());
  }
  std::vector<bool> values;
  for (char c : *t.raw) values.push_back(c != 0);
  return values;
}

// The one element of a scalar input.
template <typename T>
absl::StatusOr<T> Single(const Tensor& t, absl::StatusOr<std::vector<T>> values) {
  if (!values.ok()) return values.status();
  if (values->size() != 1) {
    return Invalid(absl::StrCat("input `", t.name(),
                                "` must hold one element (one request per "
                                "call), got ",
                                values->size()));
  }
  return (*values)[0];
}

struct Generation {
  engine::GenerationInput input;
  bool stream = false;
  bool empty_final_response = false;
  std::string prefix;  // the prompt, echoed first when exclude_input_in_output is false
};

// sampling_parameters: a JSON object with vLLM's names.
absl::Status ApplySamplingJson(const std::string& text, Generation& generation) {
  nlohmann::json object = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (object.is_discarded() || !object.is_object()) {
    return Invalid("input `sampling_parameters` must be a JSON object");
  }
  engine::GenerationInput& input = generation.input;
  for (const auto& [key, value] : object.items()) {
    // vLLM's backend sends numbers as numbers or as strings; accept both.
    auto number = [&value]() -> std::optional<double> {
      if (value.is_number()) return value.get<double>();
      if (value.is_string()) {
        char* end = nullptr;
        const std::string s = value.get<std::string>();
        const double parsed = std::strtod(s.c_str(), &end);
        if (end != s.c_str() && *end == '\0') return parsed;
      }
      return std::nullopt;
    };
    auto flag = [&value]() -> std::optional<bool> {
      if (value.is_boolean()) return value.get<bool>();
      if (value.is_string()) {
        if (value == "true" || value == "True") return true;
        if (value == "false" || value == "False") return false;
      }
      return std::nullopt;
    };
    auto bad = [&key]() {
      return Invalid(absl::StrCat("sampling_parameters.", key, " has the wrong type"));
    };
    if (key == "temperature" || key == "top_p" || key == "top_k" || key == "max_tokens" ||
        key == "seed" || key == "random_seed") {
      std::optional<double> v = number();
      if (!v || !std::isfinite(*v)) return bad();
      if (key == "temperature") input.sampling.temperature = static_cast<float>(*v);
      if (key == "top_p") input.sampling.top_p = static_cast<float>(*v);
      if (key == "top_k") input.sampling.top_k = *v <= 0 ? 0 : static_cast<int>(*v);
      if (key == "max_tokens") {
        input.max_tokens = *v < 0 ? 0 : *v > INT32_MAX ? INT32_MAX : static_cast<int>(*v);
      }
      if (key == "seed" || key == "random_seed") {
        input.sampling.seed = static_cast<uint64_t>(static_cast<int64_t>(*v));
      }
    } else if (key == "ignore_eos") {
      std::optional<bool> v = flag();
      if (!v) return bad();
      input.ignore_eos = *v;
    } else if (key == "stop") {
      if (value.is_string()) {
        input.stop.push_back(value.get<std::string>());
      } else if (value.is_array()) {
        for (const auto& s : value) {
          if (!s.is_string()) return bad();
          input.stop.push_back(s.get<std::string>());
        }
      } else {
        return bad();
      }
    } else {
      return Invalid(absl::StrCat("sampling_parameters.", key,
                                  " is not supported (temperature, top_p, top_k, max_tokens, "
                                  "seed, stop, ignore_eos)"));
    }
  }
  return absl::OkStatus();
}

constexpr char kKnownInputs[] =
    "text_input, input_ids, max_tokens, stream, temperature, top_p, top_k, random_seed, "
    "stop_words, ignore_eos, exclude_input_in_output, sampling_parameters";

absl::StatusOr<Generation> ParseRequest(const inference::ModelInferRequest& request,
                                        const std::string& model_name) {
  if (request.model_name() != model_name) {
    return absl::NotFoundError(absl::StrCat("unknown model `", request.model_name(),
                                            "`; this server serves `", model_name, "`"));
  }
  if (!request.model_version().empty() && request.model_version() != kVersion) {
    return absl::NotFoundError(absl::StrCat("model `", model_name, "` has no version `",
                                            request.model_version(), "` (only ", kVersion, ")"));
  }
  if (request.raw_input_contents_size() > 0 &&
      request.raw_input_contents_size() != request.inputs_size()) {
    return Invalid(absl::StrCat("raw_input_contents has ", request.raw_input_contents_size(),
                                " entries for ", request.inputs_size(), " inputs"));
  }
  for (const auto& output : request.outputs()) {
    if (output.name() != "text_output") {
      return Invalid(absl::StrCat("unknown output `", output.name(),
                                  "` (the model has one: "
                                  "text_output)"));
    }
  }
  Generation generation;
  engine::GenerationInput& input = generation.input;
  input.request_id = request.id();
  input.max_tokens = 16;  // as Triton's vLLM backend, when the request says nothing
  bool exclude_input = true;
  bool has_prompt = false;
  for (int i = 0; i < request.inputs_size(); ++i) {
    Tensor t{&request.inputs(i),
             request.raw_input_contents_size() > 0 ? &request.raw_input_contents(i) : nullptr};
    const std::string& name = t.name();
    if (name == "text_input") {
      absl::StatusOr<std::string> text = Single(t, BytesValues(t));
      if (!text.ok()) return text.status();
      input.text = std::move(*text);
      has_prompt = true;
    } else if (name == "input_ids") {
      absl::StatusOr<std::vector<int64_t>> ids = IntegerValues(t);
      if (!ids.ok()) return ids.status();
      // As sent: the engine checks them against the vocabulary and reports the id.
      input.prompt_tokens.assign(ids->begin(), ids->end());
      has_prompt = true;
    } else if (name == "max_tokens") {
      absl::StatusOr<int64_t> v = Single(t, IntegerValues(t));
      if (!v.ok()) return v.status();
      input.max_tokens = *v < 0 ? 0 : *v > INT32_MAX ? INT32_MAX : static_cast<int>(*v);
    } else if (name == "stream") {
      absl::StatusOr<bool> v = Single(t, BoolValues(t));
      if (!v.ok()) return v.status();
      generation.stream = *v;
    } else if (name == "temperature" || name == "top_p") {
      absl::StatusOr<double> v = Single(t, FloatValues(t));
      if (!v.ok()) return v.status();
      (name == "temperature" ? input.sampling.temperature : input.sampling.top_p) =
          static_cast<float>(*v);
    } else if (name == "top_k") {
      absl::StatusOr<int64_t> v = Single(t, IntegerValues(t));
      if (!v.ok()) return v.status();
      input.sampling.top_k = *v <= 0 ? 0 : *v > INT32_MAX ? INT32_MAX : static_cast<int>(*v);
    } else if (name == "random_seed") {
      absl::StatusOr<int64_t> v = Single(t, IntegerValues(t));
      if (!v.ok()) return v.status();
      input.sampling.seed = static_cast<uint64_t>(*v);
    } else if (name == "stop_words") {
      absl::StatusOr<std::vector<std::string>> words = BytesValues(t);
      if (!words.ok()) return words.status();
      for (std::string& word : *words) {
        if (!word.empty()) input.stop.push_back(std::move(word));
      }
    } else if (name == "ignore_eos" || name == "exclude_input_in_output") {
      absl::StatusOr<bool> v = Single(t, BoolValues(t));
      if (!v.ok()) return v.status();
      (name == "ignore_eos" ? input.ignore_eos : exclude_input) = *v;
    } else if (name == "sampling_parameters") {
      absl::StatusOr<std::string> text = Single(t, BytesValues(t));
      if (!text.ok()) return text.status();
      if (auto status = ApplySamplingJson(*text, generation); !status.ok()) return status;
    } else {
      return Invalid(absl::StrCat("unknown input `", name, "` (known: ", kKnownInputs, ")"));
    }
  }
  if (!has_prompt) return Invalid("the request needs a `text_input` (or `input_ids`) input");
  if (input.text.has_value() && !input.prompt_tokens.empty()) {
    return Invalid("give either `text_input` or `input_ids`, not both");
  }
  if (!exclude_input && input.text.has_value()) generation.prefix = *input.text;
  if (auto it = request.parameters().find(kEmptyFinalResponse);
      it != request.parameters().end() && it->second.has_bool_param()) {
    generation.empty_final_response = it->second.bool_param();
  }
  return generation;
}

// A response carrying `text` as text_output (raw, as Triton answers).
void FillResponse(const std::string& model_name, const std::string& id, std::string_view text,
                  inference::ModelInferResponse* response) {
  response->set_model_name(model_name);
  response->set_model_version(kVersion);
  response->set_id(id);
  auto* output = response->add_outputs();
  output->set_name("text_output");
  output->set_datatype("BYTES");
  output->add_shape(1);
  std::string raw(4, '\0');
  const uint32_t length = static_cast<uint32_t>(text.size());
  std::memcpy(raw.data(), &length, 4);
  raw.append(text);
  response->add_raw_output_contents(std::move(raw));
}

void AddFinishParameters(const engine::GenerationOutput& last,
                         inference::ModelInferResponse* response) {
  auto& parameters = *response->mutable_parameters();
  parameters["finish_reason"].set_string_param(
      last.finish_reason == engine::FinishReason::kStop ? "stop" : "length");
  parameters["prompt_tokens"].set_int64_param(last.usage.prompt_tokens);
  parameters["completion_tokens"].set_int64_param(last.usage.completion_tokens);
}

absl::Status StatusOfOutput(const engine::GenerationOutput& output) {
  if (!output.status.ok()) return output.status;
  if (output.finish_reason == engine::FinishReason::kAborted) {
    return absl::UnavailableError("the server stopped before the request finished");
  }
  if (output.finish_reason == engine::FinishReason::kCancelled) {
    return absl::CancelledError("the request was cancelled");
  }
  return absl::OkStatus();
}

grpc::Status NotLoaded() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading; retry shortly");
}

// A stream's error message names the code, since the stream itself stays OK.
std::string StreamErrorMessage(const absl::Status& status) {
  return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
}

}  // namespace

bool KServeService::Ready() const {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return false;
  for (const engine::GroupHealth& group : engine->Health()) {
    if (!group.status.ok()) return false;
  }
  return true;
}

grpc::Status KServeService::ServerLive(grpc::ServerContext*, const inference::ServerLiveRequest*,
                                       inference::ServerLiveResponse* response) {
  response->set_live(true);
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerReady(grpc::ServerContext*, const inference::ServerReadyRequest*,
                                        inference::ServerReadyResponse* response) {
  response->set_ready(Ready());
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelReady(grpc::ServerContext*,
                                       const inference::ModelReadyRequest* request,
                                       inference::ModelReadyResponse* response) {
  engine::Engine* engine = engine_.load();
  response->set_ready(engine != nullptr && request->name() == engine->model_info().name &&
                      (request->version().empty() || request->version() == kVersion) && Ready());
  return grpc::Status::OK;
}

grpc::Status KServeService::ServerMetadata(grpc::ServerContext*,
                                           const inference::ServerMetadataRequest*,
                                           inference::ServerMetadataResponse* response) {
  response->set_name("moeserve");
  response->set_version(base::Version());
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelMetadata(grpc::ServerContext*,
                                          const inference::ModelMetadataRequest* request,
                                          inference::ModelMetadataResponse* response) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return NotLoaded();
  const std::string& name = engine->model_info().name;
  if (request->name() != name || (!request->version().empty() && request->version() != kVersion)) {
    return grpc::Status(
        grpc::StatusCode::NOT_FOUND,
        absl::StrCat("unknown model `", request->name(), "` version `", request->version(),
                     "`; this server serves `", name, "` version ", kVersion));
  }
  response->set_name(name);
  response->add_versions(std::string(kVersion));
  response->set_platform("moeserve");
  auto add = [](auto* list, const char* tensor, const char* datatype, int64_t size) {
    auto* metadata = list->Add();
    metadata->set_name(tensor);
    metadata->set_datatype(datatype);
    metadata->add_shape(size);
  };
  add(response->mutable_inputs(), "text_input", "BYTES", 1);
  add(response->mutable_inputs(), "input_ids", "INT32", -1);
  add(response->mutable_inputs(), "max_tokens", "INT32", 1);
  add(response->mutable_inputs(), "stream", "BOOL", 1);
  add(response->mutable_inputs(), "temperature", "FP32", 1);
  add(response->mutable_inputs(), "top_p", "FP32", 1);
  add(response->mutable_inputs(), "top_k", "INT32", 1);
  add(response->mutable_inputs(), "random_seed", "UINT64", 1);
  add(response->mutable_inputs(), "stop_words", "BYTES", -1);
  add(response->mutable_inputs(), "ignore_eos", "BOOL", 1);
  add(response->mutable_inputs(), "exclude_input_in_output", "BOOL", 1);
  add(response->mutable_inputs(), "sampling_parameters", "BYTES", 1);
  add(response->mutable_outputs(), "text_output", "BYTES", 1);
  return grpc::Status::OK;
}

grpc::Status KServeService::ModelInfer(grpc::ServerContext* context,
                                       const inference::ModelInferRequest* request,
                                       inference::ModelInferResponse* response) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return NotLoaded();
  const std::string& model_name = engine->model_info().name;
  absl::StatusOr<Generation> generation = ParseRequest(*request, model_name);
  if (!generation.ok()) return ToGrpcStatus(generation.status());
  if (generation->stream) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "`stream` = true needs ModelStreamInfer (decoupled streaming); "
                        "ModelInfer answers once");
  }
  absl::StatusOr<std::shared_ptr<engine::RequestStream>> stream =
      engine->Submit(std::move(generation->input));
  if (!stream.ok()) return ToGrpcStatus(stream.status());
  std::string text = generation->prefix;
  while (true) {
    // Checked before every wait: nothing is written until the end, so a client that gave up
    // is noticed only here, even while tokens flow.
    if (context->IsCancelled()) {
      (*stream)->Cancel();  // frees its KV blocks at the next step
      return grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
    }
    std::optional<engine::GenerationOutput> output = (*stream)->Next(kPollInterval);
    if (!output.has_value()) continue;
    if (absl::Status status = StatusOfOutput(*output); !status.ok()) return ToGrpcStatus(status);
    text += output->text;
    if (output->is_last()) {
      FillResponse(model_name, request->id(), text, response);
      AddFinishParameters(*output, response);
      return grpc::Status::OK;
    }
  }
}

grpc::Status KServeService::ModelStreamInfer(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<inference::ModelStreamInferResponse, inference::ModelInferRequest>*
        stream) {
  engine::Engine* engine = engine_.load();
  if (engine == nullptr) return NotLoaded();
  const std::string model_name = engine->model_info().name;
  std::mutex write_mutex;  // one writer at a time; reads go on in this thread
  auto write = [&](const inference::ModelStreamInferResponse& response) {
    std::lock_guard<std::mutex> lock(write_mutex);
    return stream->Write(response);
  };
  auto write_error = [&](const std::string& id, const absl::Status& status) {
    inference::ModelStreamInferResponse response;
    response.set_error_message(StreamErrorMessage(status));
    response.mutable_infer_response()->set_model_name(model_name);
    response.mutable_infer_response()->set_model_version(kVersion);
    response.mutable_infer_response()->set_id(id);
    return write(response);
  };

  // Requests of one stream run concurrently, each driven by its own thread.
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::vector<Worker> workers;
  auto reap = [&workers](bool all) {
    for (auto it = workers.begin(); it != workers.end();) {
      if (all || it->done->load()) {
        it->thread.join();
        it = workers.erase(it);
      } else {
        ++it;
      }
    }
  };

  inference::ModelInferRequest request;
  while (stream->Read(&request)) {
    reap(/*all=*/false);
    const std::string id = request.id();
    absl::StatusOr<Generation> generation = ParseRequest(request, model_name);
    if (!generation.ok()) {
      write_error(id, generation.status());
      continue;
    }
    const bool streaming = generation->stream;
    const bool empty_final = generation->empty_final_response;
    std::string prefix = generation->prefix;
    absl::StatusOr<std::shared_ptr<engine::RequestStream>> submitted =
        engine->Submit(std::move(generation->input));
    if (!submitted.ok()) {
      write_error(id, submitted.status());
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    workers.push_back(
        {std::thread([&, id, streaming, empty_final, prefix, done,
                      request_stream = std::move(*submitted)]() mutable {
           std::string text = std::move(prefix);
           while (true) {
             // Non-streaming requests write nothing until the end: look for a cancelled
             // stream before every wait.
             if (context->IsCancelled()) {
               request_stream->Cancel();
               break;
             }
             std::optional<engine::GenerationOutput> output = request_stream->Next(kPollInterval);
             if (!output.has_value()) continue;
             if (absl::Status status = StatusOfOutput(*output); !status.ok()) {
               write_error(id, status);
               break;
             }
             const bool last = output->is_last();
             text += output->text;
             if (!streaming && !last) continue;
             inference::ModelStreamInferResponse response;
             auto* infer = response.mutable_infer_response();
             FillResponse(model_name, id, text, infer);
             text.clear();
             if (last) AddFinishParameters(*output, infer);
             (*infer->mutable_parameters())[kFinalResponse].set_bool_param(last && !empty_final);
             if (!write(response)) {
               request_stream->Cancel();  // the client went away
               break;
             }
             if (last) {
               if (empty_final) {
                 inference::ModelStreamInferResponse final_response;
                 auto* final_infer = final_response.mutable_infer_response();
                 final_infer->set_model_name(model_name);
                 final_infer->set_model_version(kVersion);
                 final_infer->set_id(id);
                 (*final_infer->mutable_parameters())[kFinalResponse].set_bool_param(true);
                 write(final_response);
               }
               break;
             }
           }
           done->store(true);
         }),
         done});
  }
  // The client closed its side: finish what it asked for, then end the stream.
  reap(/*all=*/true);
  return grpc::Status::OK;
}

}  // namespace moeserve::server
