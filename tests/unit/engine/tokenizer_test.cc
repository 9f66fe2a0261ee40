// ByteTokenizer and Utf8StreamDecoder. Expected replacements follow the Unicode "maximal
// subpart" practice: each maximal invalid subsequence becomes one U+FFFD.
#include "engine/model/tokenizer.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

using ::testing::ElementsAre;

const std::string kFffd = "\xEF\xBF\xBD";

TEST(ByteTokenizer, EncodesBytesAfterBos) {
  ByteTokenizer tokenizer(256, 257);
  EXPECT_THAT(*tokenizer.Encode("hi"), ElementsAre(256, 'h', 'i'));
  EXPECT_THAT(*tokenizer.Encode(""), ElementsAre(256));
  // Bytes >= 0x80 map to ids 128..255, never to negative ids.
  EXPECT_THAT(*tokenizer.Encode("\xC3\xA9"), ElementsAre(256, 0xC3, 0xA9));
  EXPECT_THAT(*tokenizer.Encode(std::string("\0\xFF", 2)), ElementsAre(256, 0, 255));
}

TEST(ByteTokenizer, RoundTripsAnyText) {
  ByteTokenizer tokenizer(256, 257);
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes.push_back(static_cast<char>(b));
  for (const std::string& text :
       {std::string("hello, world"), std::string("h\xC3\xA9llo \xF0\x9F\x98\x80"), all_bytes}) {
    const std::vector<int32_t> ids = *tokenizer.Encode(text);
    ASSERT_EQ(ids.size(), text.size() + 1);
    EXPECT_EQ(ids[0], 256);
    std::string decoded;
    for (int32_t id : ids) decoded += tokenizer.TokenBytes(id);
    EXPECT_EQ(decoded, text);
  }
}

TEST(ByteTokenizer, SpecialAndOutOfRangeTokensDecodeToNothing) {
  ByteTokenizer tokenizer(256, 257);
  EXPECT_EQ(tokenizer.TokenBytes(256), "");
  EXPECT_EQ(tokenizer.TokenBytes(257), "");
  EXPECT_EQ(tokenizer.TokenBytes(-1), "");
  EXPECT_EQ(tokenizer.TokenBytes(100000), "");
}

TEST(Utf8StreamDecoder, PassesAsciiThrough) {
  Utf8StreamDecoder decoder;
  EXPECT_EQ(decoder.Push("abc"), "abc");
  EXPECT_EQ(decoder.Push(""), "");
  EXPECT_EQ(decoder.Flush(), "");
}

TEST(Utf8StreamDecoder, HoldsBackSplitTwoByteSequence) {
  Utf8StreamDecoder decoder;
  EXPECT_EQ(decoder.Push("h\xC3"), "h");
  EXPECT_EQ(decoder.Push("\xA9!"), "\xC3\xA9!");
  EXPECT_EQ(decoder.Flush(), "");
}

TEST(Utf8StreamDecoder, HoldsBackFourByteSequenceSplitByteByByte) {
  Utf8StreamDecoder decoder;  // U+1F600 = F0 9F 98 80
  EXPECT_EQ(decoder.Push("\xF0"), "");
  EXPECT_EQ(decoder.Push("\x9F"), "");
  EXPECT_EQ(decoder.Push("\x98"), "");
  EXPECT_EQ(decoder.Push("\x80"), "\xF0\x9F\x98\x80");
}

TEST(Utf8StreamDecoder, ThreeByteSequenceAcrossTwoPushes) {
  Utf8StreamDecoder decoder;  // U+20AC € = E2 82 AC
  EXPECT_EQ(decoder.Push("a\xE2\x82"), "a");
  EXPECT_EQ(decoder.Push("\xAC"
                         "b"),
            "\xE2\x82\xAC"
            "b");
}

TEST(Utf8StreamDecoder, LoneContinuationByteIsReplaced) {
  Utf8StreamDecoder decoder;
  EXPECT_EQ(decoder.Push("a\x80"
                         "b"),
            "a" + kFffd + "b");
  EXPECT_EQ(decoder.Push("\xBF"), kFffd);
}

TEST(Utf8StreamDecoder, OverlongLeadBytesC0C1AreReplaced) {
  Utf8StreamDecoder decoder;
  // C0 AF (overlong '/') and C1 81: C0/C1 never start a character; their followers are then
  // lone continuation bytes. Four replacements.
  EXPECT_EQ(decoder.Push("\xC0\xAF\xC1\x81"), kFffd + kFffd + kFffd + kFffd);
  // Overlong 3-byte form E0 80 AF: E0 needs A0..BF next.
  EXPECT_EQ(decoder.Push("\xE0\x80\xAF"), kFffd + kFffd + kFffd);
}

TEST(Utf8StreamDecoder, SurrogatesAreReplaced) {
  Utf8StreamDecoder decoder;
  // ED A0 80 would encode U+D800: ED allows only 80..9F next.
  EXPECT_EQ(decoder.Push("\xED\xA0\x80"), kFffd + kFffd + kFffd);
  // ED 9F BF (U+D7FF) is valid.
  EXPECT_EQ(decoder.Push("\xED\x9F\xBF"), "\xED\x9F\xBF");
}

TEST(Utf8StreamDecoder, InvalidByteIsNotHeldBack) {
  Utf8StreamDecoder decoder;
  // F5..FF never start a character: released at once, not held.
  EXPECT_EQ(decoder.Push("\xF5"), kFffd);
  EXPECT_EQ(decoder.Push("\xFF"), kFffd);
  // Beyond U+10FFFF: F4 90.
  EXPECT_EQ(decoder.Push("\xF4\x90\x80\x80"), kFffd + kFffd + kFffd + kFffd);
}

TEST(Utf8StreamDecoder, TruncatedSequenceFollowedByAsciiIsOneReplacement) {
  Utf8StreamDecoder decoder;
  EXPECT_EQ(decoder.Push("a\xE2\x82"), "a");
  EXPECT_EQ(decoder.Push("z"), kFffd + "z");
  EXPECT_EQ(decoder.Push("\xF0\x9F\x98"
                         "\xC3\xA9"),
            kFffd + "\xC3\xA9");
}

TEST(Utf8StreamDecoder, FlushReleasesHeldBytesAsReplacement) {
  Utf8StreamDecoder decoder;
  EXPECT_EQ(decoder.Push("ok\xE2\x82"), "ok");
  EXPECT_EQ(decoder.Flush(), kFffd);
  EXPECT_EQ(decoder.Flush(), "");
  // The decoder is usable again after a flush.
  EXPECT_EQ(decoder.Push("\xC3\xA9"), "\xC3\xA9");
}

TEST(Utf8StreamDecoder, ByteByByteStreamOfMixedTextReassembles) {
  const std::string text = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80z";
  Utf8StreamDecoder decoder;
  std::string out;
  for (char c : text) out += decoder.Push(std::string(1, c));
  out += decoder.Flush();
  EXPECT_EQ(out, text);
}

}  // namespace
}  // namespace moeserve::engine
