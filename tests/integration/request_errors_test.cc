// Requests as a hostile client writes them, against the real server: bytes that are no
// protobuf message, invalid UTF-8 in string fields, and token ids beyond int32. Each gets
// INVALID_ARGUMENT with a message that says what is wrong.
#include <chrono>
#include <future>
#include <string>

#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Calls `method` with `bytes` as the request message, as is, and returns the status.
grpc::Status RawCall(ServerProcess& server, const std::string& method, const std::string& bytes) {
  grpc::GenericStub stub(server.channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status status) { done.set_value(status); });
  return done.get_future().get();
}

TEST(RequestErrors, UnparseableMessagesGetInvalidArgumentWithAMessage) {
  ServerProcess server({});
  ASSERT_TRUE(server.ok());
  const struct {
    const char* what;
    const char* method;
    std::string bytes;
  } cases[] = {
      // Field 2 (text), length 10, but only 2 bytes follow.
      {"truncated", "/moeserve.v1.Generation/Generate",
       std::string("\x12\x0a"
                   "ab",
                   4)},
      // Field 2 (text) holding bytes that are not UTF-8.
      {"invalid UTF-8 text", "/moeserve.v1.Generation/Generate",
       std::string("\x12\x02\xff\xfe", 4)},
      // Field 1 (request_id) holding a lone continuation byte.
      {"invalid UTF-8 request_id", "/moeserve.v1.Generation/Generate",
       std::string("\x0a\x01\x80\x12\x02hi", 7)},
      // A wire type no field can have.
      {"garbage", "/moeserve.v1.Generation/GetModelInfo", std::string("\xff\xff\xff\xff", 4)},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const grpc::Status status = RawCall(server, c.method, c.bytes);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("could not be parsed"));
  }
  // A well-formed request still works, and an error of the handler itself is untouched.
  v1::GenerateRequest request;
  request.set_text("hi");
  request.set_max_tokens(0);
  const grpc::Status handler_error =
      RawCall(server, "/moeserve.v1.Generation/Generate", request.SerializeAsString());
  EXPECT_EQ(handler_error.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(handler_error.error_message(), HasSubstr("max_tokens must be at least 1"));
  EXPECT_THAT(handler_error.error_message(), Not(HasSubstr("could not be parsed")));
}

TEST(RequestErrors, TokenIdsBeyondInt32AreReportedAsSent) {
  ServerProcess server({});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Generation::NewStub(server.channel());
  for (uint32_t id : {2147483648u, 4294967295u}) {
    v1::GenerateRequest request;
    request.mutable_token_ids()->add_ids(5);
    request.mutable_token_ids()->add_ids(id);
    request.set_max_tokens(4);
    grpc::ClientContext context;
    auto reader = stub->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
    }
    const grpc::Status status = reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(),
                HasSubstr("token_ids[1] = " + std::to_string(id) + " is out of range"));
  }
  v1::GenerateRequest request;
  request.set_text("hi");
  request.set_max_tokens(4);
  request.add_stop_token_ids(2147483648u);
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
  }
  EXPECT_THAT(reader->Finish().error_message(), HasSubstr("stop_token_ids has 2147483648"));
}

}  // namespace
}  // namespace moeserve::testing
