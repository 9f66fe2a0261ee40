#include "server/request_parse_errors.h"

#include <string>

namespace moeserve::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

class RequestParseErrorInterceptor : public grpc::experimental::Interceptor {
 public:
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // After a failed parse gRPC hands the interceptors a null request message.
    if (methods->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE) &&
        methods->GetRecvMessage() == nullptr) {
      request_unparseable_ = true;
    }
    if (request_unparseable_ &&
        methods->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_STATUS)) {
      const grpc::Status status = methods->GetSendStatus();
      if (status.error_code() == grpc::StatusCode::INTERNAL) {
        methods->ModifySendStatus(grpc::Status(
            grpc::StatusCode::INVALID_ARGUMENT,
            "the request message could not be parsed: it is truncated, is not this method's "
            "protobuf message, or has a string field that is not valid UTF-8"));
      }
    }
    methods->Proceed();
  }

 private:
  bool request_unparseable_ = false;
};

class RequestParseErrorInterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* /*info*/) override {
    return new RequestParseErrorInterceptor();
  }
};

}  // namespace

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
RequestParseErrorInterceptors() {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> factories;
  factories.push_back(std::make_unique<RequestParseErrorInterceptorFactory>());
  return factories;
}

}  // namespace moeserve::server
