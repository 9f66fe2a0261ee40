#include "eplb/rebalance_jsonl.h"

#include <algorithm>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "base/bounded_json.h"
#include "nlohmann/json.hpp"

namespace moeserve::eplb {
namespace {

using nlohmann::json;

constexpr std::string_view kKnownFields[] = {"id",         "weight",    "num_replicas",
                                             "num_groups", "num_nodes", "num_gpus"};

// A value as JSON for an error message, cut short so a huge value cannot flood the output.
std::string Preview(const json& value) {
  constexpr size_t kMaxPreviewChars = 60;
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > kMaxPreviewChars) text = text.substr(0, kMaxPreviewChars) + "...";
  return text;
}

absl::Status ReadCountField(const json& object, const char* field, int* value) {
  const auto it = object.find(field);
  if (it == object.end()) {
    return absl::InvalidArgumentError(absl::StrCat("missing field \"", field, "\""));
  }
  if (it->is_number_unsigned()) {
    const uint64_t number = it->get<uint64_t>();
    if (number > static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(field, " is too large: ", number));
    }
    *value = static_cast<int>(number);
    return absl::OkStatus();
  }
  if (it->is_number_integer()) {
    const int64_t number = it->get<int64_t>();
    if (number < std::numeric_limits<int>::min()) {
      return absl::InvalidArgumentError(absl::StrCat(field, " is too small: ", number));
    }
    // Non-positive values pass through; RebalanceExperts explains what they must be.
    *value = static_cast<int>(number);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be a JSON integer, got ", Preview(*it)));
}

absl::Status ReadWeightField(const json& object, std::vector<std::vector<float>>* weight) {
  const auto it = object.find("weight");
  if (it == object.end()) return absl::InvalidArgumentError("missing field \"weight\"");
  if (!it->is_array()) {
    return absl::InvalidArgumentError("weight must be an array of layers, each an array of loads");
  }
  weight->clear();
  weight->reserve(it->size());
  for (size_t layer = 0; layer < it->size(); ++layer) {
    const json& row = (*it)[layer];
    if (!row.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("weight[", layer, "] must be an array of loads, got ", Preview(row)));
    }
    std::vector<float>& loads = weight->emplace_back();
    loads.reserve(row.size());
    for (size_t expert = 0; expert < row.size(); ++expert) {
      const json& cell = row[expert];
      if (!cell.is_number()) {
        return absl::InvalidArgumentError(absl::StrCat("weight[", layer, "][", expert,
                                                       "] must be a number, got ", Preview(cell)));
      }
      const double load = cell.get<double>();
      // Converting an out-of-range double to float is undefined behaviour, so check first.
      if (!std::isfinite(load) || std::fabs(load) > FLT_MAX) {
        return absl::InvalidArgumentError(absl::StrCat("weight[", layer, "][", expert, "] is ",
                                                       load, ", outside the float32 range"));
      }
      loads.push_back(static_cast<float>(load));
    }
  }
  return absl::OkStatus();
}

// Writes integers and punctuation straight into a buffer that the caller sized for the worst
// case; several times faster than growing a std::string one character at a time.
class IntegerWriter {
 public:
  static constexpr size_t kMaxIntegerChars = 11;  // "-2147483648"

  explicit IntegerWriter(char* next) : next_(next) {}
  void Put(char character) { *next_++ = character; }
  void Put(std::string_view text) { next_ = std::copy(text.begin(), text.end(), next_); }
  void Put(int value) { next_ = std::to_chars(next_, next_ + kMaxIntegerChars, value).ptr; }
  void PutMatrix(const std::vector<std::vector<int>>& rows) {
    Put('[');
    for (size_t i = 0; i < rows.size(); ++i) {
      if (i > 0) Put(',');
      Put('[');
      for (size_t j = 0; j < rows[i].size(); ++j) {
        if (j > 0) Put(',');
        Put(rows[i][j]);
      }
      Put(']');
    }
    Put(']');
  }
  char* next() const { return next_; }

 private:
  char* next_;
};

// Reads lines of the common shape (plain ASCII keys and ids, numbers, no escapes, no
// duplicate fields) several times faster than building a JSON document: numbers go straight
// from text to float with std::from_chars. It declines -- returns false -- on anything else,
// including every kind of error, and leaves those lines to ParseRebalanceCaseGeneral, so every
// error message comes from one place. Whatever it accepts, it reads exactly as the general
// parser would (tests/unit/eplb/rebalance_jsonl_test.cc compares the two).
class CommonCaseReader {
 public:
  explicit CommonCaseReader(std::string_view line)
      : next_(line.data()), end_(line.data() + line.size()) {}

  bool Read(RebalanceCase* rebalance_case) {
    rebalance_case->id_json = "null";
    if (!Consume('{')) return false;
    unsigned fields_seen = 0;
    constexpr unsigned kAllRequired = 0b111110;  // every field but id (bit 0)
    if (Consume('}')) return false;              // required fields missing
    do {
      std::string_view key;
      if (!ReadPlainString(&key) || !Consume(':')) return false;
      int field = 0;
      while (field < static_cast<int>(std::size(kKnownFields)) && kKnownFields[field] != key) {
        ++field;
      }
      if (field == static_cast<int>(std::size(kKnownFields))) return false;
      if (fields_seen & (1u << field)) return false;  // duplicates: let the library decide
      fields_seen |= 1u << field;
      ClusterShape& shape = rebalance_case->shape;
      bool ok = false;
      switch (field) {
        case 0:
          ok = ReadId(&rebalance_case->id_json);
          break;
        case 1:
          ok = ReadWeight(&rebalance_case->weight);
          break;
        case 2:
          ok = ReadCount(&shape.num_replicas);
          break;
        case 3:
          ok = ReadCount(&shape.num_groups);
          break;
        case 4:
          ok = ReadCount(&shape.num_nodes);
          break;
        case 5:
          ok = ReadCount(&shape.num_gpus);
          break;
      }
      if (!ok) return false;
    } while (Consume(','));
    if (!Consume('}')) return false;
    SkipSpace();
    return next_ == end_ && (fields_seen & kAllRequired) == kAllRequired;
  }

 private:
  void SkipSpace() {
    while (next_ < end_ && (*next_ == ' ' || *next_ == '\t' || *next_ == '\n' || *next_ == '\r')) {
      ++next_;
    }
  }

  bool Consume(char expected) {
    SkipSpace();
    if (next_ == end_ || *next_ != expected) return false;
    ++next_;
    return true;
  }

  // A string of printable ASCII without escapes; `text` excludes the quotes.
  bool ReadPlainString(std::string_view* text) {
    if (!Consume('"')) return false;
    const char* start = next_;
    while (next_ < end_ && *next_ != '"') {
      const unsigned char byte = static_cast<unsigned char>(*next_);
      if (byte < 0x20 || byte > 0x7e || byte == '\\') return false;
      ++next_;
    }
    if (next_ == end_) return false;
    *text = std::string_view(start, next_ - start);
    ++next_;
    return true;
  }

  // The text of one number, checked against JSON's grammar:
  // -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
  bool ScanNumber(std::string_view* text, bool* is_integer) {
    SkipSpace();
    const char* start = next_;
    const auto digits = [&] {
      const char* first = next_;
      while (next_ < end_ && *next_ >= '0' && *next_ <= '9') ++next_;
      return next_ > first;
    };
    if (next_ < end_ && *next_ == '-') ++next_;
    if (next_ < end_ && *next_ == '0') {
      ++next_;
    } else if (!digits()) {
      return false;
    }
    *is_integer = true;
    if (next_ < end_ && *next_ == '.') {
      ++next_;
      if (!digits()) return false;
      *is_integer = false;
    }
    if (next_ < end_ && (*next_ == 'e' || *next_ == 'E')) {
      ++next_;
      if (next_ < end_ && (*next_ == '+' || *next_ == '-')) ++next_;
      if (!digits()) return false;
      *is_integer = false;
    }
    *text = std::string_view(start, next_ - start);
    return true;
  }

  bool ReadLoad(float* load) {
    std::string_view text;
    bool is_integer = false;
    if (!ScanNumber(&text, &is_integer)) return false;
    double value = 0.0;
    const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
    if (result.ec != std::errc() || !(std::fabs(value) <= FLT_MAX)) return false;
    // The library stores "-0" as the integer 0, which has no sign.
    if (is_integer && value == 0.0) value = 0.0;
    *load = static_cast<float>(value);
    return true;
  }

  bool ReadCount(int* count) {
    std::string_view text;
    bool is_integer = false;
    if (!ScanNumber(&text, &is_integer) || !is_integer) return false;
    int64_t value = 0;
    const auto result = std::from_chars(text.data(), text.data() + text.size(), value);
    if (result.ec != std::errc() || value < std::numeric_limits<int>::min() ||
        value > std::numeric_limits<int>::max()) {
      return false;
    }
    *count = static_cast<int>(value);
    return true;
  }

  // Ids the library would print back unchanged: plain strings, int64 integers other than -0,
  // true, false, null.
  bool ReadId(std::string* id_json) {
    SkipSpace();
    if (next_ == end_) return false;
    if (*next_ == '"') {
      std::string_view text;
      if (!ReadPlainString(&text)) return false;
      *id_json = absl::StrCat("\"", std::string(text), "\"");
      return true;
    }
    for (const std::string_view literal : {"true", "false", "null"}) {
      if (static_cast<size_t>(end_ - next_) >= literal.size() &&
          std::string_view(next_, literal.size()) == literal) {
        next_ += literal.size();
        *id_json = std::string(literal);
        return true;
      }
    }
    std::string_view text;
    bool is_integer = false;
    if (!ScanNumber(&text, &is_integer) || !is_integer || text == "-0") return false;
    int64_t value = 0;
    if (std::from_chars(text.data(), text.data() + text.size(), value).ec != std::errc()) {
      return false;
    }
    *id_json = std::string(text);
    return true;
  }

  bool ReadWeight(std::vector<std::vector<float>>* weight) {
    weight->clear();
    if (!Consume('[')) return false;
    if (Consume(']')) return true;
    do {
      std::vector<float>& row = weight->emplace_back();
      if (!Consume('[')) return false;
      if (Consume(']')) continue;
      if (weight->size() > 1) row.reserve(weight->front().size());
      do {
        float load = 0.0f;
        if (!ReadLoad(&load)) return false;
        row.push_back(load);
      } while (Consume(','));
      if (!Consume(']')) return false;
    } while (Consume(','));
    return Consume(']');
  }

  const char* next_;
  const char* end_;
};

}  // namespace

namespace internal {

bool TryParseCommonRebalanceCase(std::string_view line, RebalanceCase* rebalance_case) {
  return CommonCaseReader(line).Read(rebalance_case);
}

absl::Status ParseRebalanceCaseGeneral(std::string_view line, RebalanceCase* rebalance_case) {
  rebalance_case->id_json = "null";
  // Valid cases nest three levels (object, weight, row) plus whatever the id holds; a line like
  // "[[[[..." a million deep is refused before the JSON library recurses through it.
  if (absl::Status status = base::CheckJsonNesting(line); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: ", status.message()));
  }
  json object;
  try {
    object = json::parse(line.begin(), line.end());
  } catch (const json::exception& error) {
    // what() reads "[json.exception.parse_error.101] parse error at ..."; keep the readable part.
    std::string_view message = error.what();
    if (const size_t bracket = message.find("] "); bracket != std::string_view::npos) {
      message.remove_prefix(bracket + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: ", std::string(message)));
  }
  if (!object.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "each line must be a JSON object with weight and the counts, got ", object.type_name()));
  }
  if (const auto id = object.find("id"); id != object.end()) {
    rebalance_case->id_json = id->dump();
  }
  for (const auto& [key, value] : object.items()) {
    bool known = false;
    for (const std::string_view field : kKnownFields) known = known || key == field;
    if (!known) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown field \"", key,
                       "\"; expected id, weight, num_replicas, num_groups, num_nodes, num_gpus"));
    }
  }
  if (absl::Status status = ReadWeightField(object, &rebalance_case->weight); !status.ok()) {
    return status;
  }
  ClusterShape& shape = rebalance_case->shape;
  for (const auto& [field, value] :
       {std::pair{"num_replicas", &shape.num_replicas}, std::pair{"num_groups", &shape.num_groups},
        std::pair{"num_nodes", &shape.num_nodes}, std::pair{"num_gpus", &shape.num_gpus}}) {
    if (absl::Status status = ReadCountField(object, field, value); !status.ok()) return status;
  }
  return absl::OkStatus();
}

}  // namespace internal

absl::Status ParseRebalanceCase(std::string_view line, RebalanceCase* rebalance_case) {
  if (internal::TryParseCommonRebalanceCase(line, rebalance_case)) return absl::OkStatus();
  return internal::ParseRebalanceCaseGeneral(line, rebalance_case);
}

void AppendPlanLine(std::string_view id_json, const ExpertPlacementPlan& plan, std::string* out) {
  // Size the buffer for the worst case once. Every integer written is -1 or at most
  // num_physical_experts, so it needs no more characters than that number has digits (or two,
  // for "-1"), plus a comma; every row adds two brackets. A tight bound matters: each page the
  // buffer touches costs a page fault, a visible share of a whole tool run.
  int max_digits = 1;
  for (int value = plan.num_physical_experts; value >= 10; value /= 10) ++max_digits;
  max_digits = std::max(max_digits, 2);
  const size_t integers =
      static_cast<size_t>(plan.num_layers) *
      (plan.num_physical_experts + plan.num_logical_experts * (plan.max_replica_count + 1));
  const size_t brackets = 4 * static_cast<size_t>(plan.num_layers) * (plan.num_logical_experts + 3);
  const size_t start = out->size();
  out->resize(start + id_json.size() + 64 + (max_digits + 1) * integers + brackets);
  IntegerWriter writer(out->data() + start);
  writer.Put(std::string_view("{\"id\":"));
  writer.Put(id_json);
  writer.Put(std::string_view(",\"phy2log\":"));
  writer.PutMatrix(plan.phy2log);
  writer.Put(std::string_view(",\"log2phy\":["));
  for (int layer = 0; layer < plan.num_layers; ++layer) {
    if (layer > 0) writer.Put(',');
    writer.Put('[');
    for (int expert = 0; expert < plan.num_logical_experts; ++expert) {
      if (expert > 0) writer.Put(',');
      writer.Put('[');
      for (int rank = 0; rank < plan.max_replica_count; ++rank) {
        if (rank > 0) writer.Put(',');
        writer.Put(plan.Log2Phy(layer, expert, rank));
      }
      writer.Put(']');
    }
    writer.Put(']');
  }
  writer.Put(std::string_view("],\"logcnt\":"));
  writer.PutMatrix(plan.logcnt);
  writer.Put(std::string_view("}\n"));
  out->resize(writer.next() - out->data());
}

void AppendErrorLine(std::string_view id_json, std::string_view message, std::string* out) {
  out->append("{\"id\":");
  out->append(id_json);
  out->append(",\"error\":");
  // Let the JSON library do the escaping (quotes, control characters, invalid UTF-8).
  out->append(json(std::string(message)).dump(-1, ' ', false, json::error_handler_t::replace));
  out->append("}\n");
}

}  // namespace moeserve::eplb
