// Requests as a hostile client writes them, against the real server: token ids beyond int32.
// Each gets INVALID_ARGUMENT with a message that says what is wrong.
#include <chrono>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;

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
