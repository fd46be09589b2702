// SmolLM2-135M's tokenizer, loaded from the GGUF, against HF on the committed corpus
// (tests/fixtures/tokenizer/, made by tools/fixtures/make_tokenizer_fixture.py).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/model/gguf.h"
#include "runtime/tokenizer/chat_template.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

using json = nlohmann::json;

class SmolLm2TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto path = testing::DefaultModelPath();
    if (!std::filesystem::exists(path)) return;
    auto gguf = GgufFile::Open(path.string());
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    auto spec = TokenizerSpecFromGguf(**gguf);
    ASSERT_TRUE(spec.ok()) << spec.status();
    spec_ = new TokenizerSpec(*spec);
    auto tok = Tokenizer::Create(*std::move(spec));
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = tok->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete spec_;
    tok_ = nullptr;
    spec_ = nullptr;
  }
  void SetUp() override {
    if (tok_ == nullptr) {
      GTEST_SKIP() << "model file " << testing::DefaultModelPath()
                   << " is absent; run `quantkv fetch-model` (or set QUANTKV_HOME) to enable "
                      "the SmolLM2 tokenizer tests";
    }
  }
  static std::string Read(const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  static Tokenizer* tok_;
  static TokenizerSpec* spec_;
};

Tokenizer* SmolLm2TokenizerTest::tok_ = nullptr;
TokenizerSpec* SmolLm2TokenizerTest::spec_ = nullptr;

TEST_F(SmolLm2TokenizerTest, Metadata) {
  EXPECT_EQ(tok_->vocab_size(), 49152);
  EXPECT_EQ(spec_->model, TokenizerModel::kByteLevelBpe);
  EXPECT_EQ(spec_->pre, "smollm");
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_FALSE(spec_->add_bos);
  EXPECT_EQ(tok_->TokenText(1), "<|im_start|>");
  EXPECT_TRUE(tok_->IsEog(2));  // <|im_end|>
  EXPECT_TRUE(tok_->IsEog(0));  // <|endoftext|>
  EXPECT_FALSE(tok_->IsEog(1));
}

TEST_F(SmolLm2TokenizerTest, CorpusMatchesHf) {
  std::ifstream in(testing::FixturePath("tokenizer/smollm2_corpus.jsonl"));
  ASSERT_TRUE(in) << "missing fixture smollm2_corpus.jsonl";
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  const json meta = json::parse(line)["meta"];
  int lines = 0, matched = 0, round_trips = 0, reported = 0;
  while (std::getline(in, line)) {
    const json row = json::parse(line);
    const std::string text = row["text"];
    const std::vector<int32_t> want = row["ids"].get<std::vector<int32_t>>();
    ++lines;
    // HF recognises special tokens in text by default; the corpus has none, so parse them too.
    auto ids = tok_->Encode(text, {.parse_special = true});
    ASSERT_TRUE(ids.ok()) << ids.status();
    if (*ids == want) {
      ++matched;
    } else if (reported++ < 5) {
      ADD_FAILURE() << "line " << lines << " differs from HF: '" << text.substr(0, 200) << "'";
    }
    auto back = tok_->Decode(*ids);
    ASSERT_TRUE(back.ok()) << back.status();
    if (*back == text) ++round_trips;
  }
  std::printf("[ corpus   ] %d/%d lines identical to HF, %d/%d round-trip\n", matched, lines,
              round_trips, lines);
  EXPECT_EQ(lines, meta["lines"].get<int>());
  EXPECT_GE(lines, 1000);
  EXPECT_EQ(matched, lines);
  EXPECT_EQ(round_trips, lines);
}

TEST_F(SmolLm2TokenizerTest, ChatTemplateMatchesHf) {
  const json cases = json::parse(Read(testing::FixturePath("tokenizer/smollm2_chat.json")));
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    std::vector<ChatMessage> messages;
    for (const json& m : c["messages"]) {
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    auto text = ApplyChatTemplate(*spec_, messages, c["add_generation_prompt"].get<bool>());
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, c["text"].get<std::string>());
    auto ids = tok_->Encode(*text, {.parse_special = true});
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c["ids"].get<std::vector<int32_t>>()) << *text;
    // Without parse_special the markers are plain text, as with HF's split_special_tokens.
    auto plain = tok_->Encode(*text);
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_EQ(*plain, c["ids_special_as_text"].get<std::vector<int32_t>>()) << *text;
    auto back = tok_->Decode(*ids);
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, *text);
  }
}

// FNV-1a over the ids as little-endian int32, as the fixture script computes it.
std::string Fnv1a64(const std::vector<int32_t>& ids) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (int32_t id : ids) {
    uint32_t u = static_cast<uint32_t>(id);
    for (int k = 0; k < 4; ++k) {
      h = (h ^ ((u >> (8 * k)) & 0xFF)) * 0x100000001B3ull;
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

TEST_F(SmolLm2TokenizerTest, EncodeSpeedAndRoundTrip) {
  // WikiText-2 test split (about 1.3 MB) if the shared data is there, else the corpus.
  std::filesystem::path wiki =
      testing::SourceDir().parent_path() / "shared" / "data" / "wikitext-2" / "test.txt";
  std::string text;
  bool is_wiki = false;
  if (std::filesystem::exists(wiki)) {
    text = Read(wiki);
    is_wiki = true;
  } else {
    std::ifstream in(testing::FixturePath("tokenizer/smollm2_corpus.jsonl"));
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) text += json::parse(line)["text"].get<std::string>() + "\n";
  }
  ASSERT_FALSE(text.empty());
  // A fresh tokenizer, so the word cache starts cold.
  auto fresh = Tokenizer::Create(*spec_);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  auto t0 = std::chrono::steady_clock::now();
  auto ids = (*fresh)->Encode(text);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(ids.ok()) << ids.status();
  const double mb = text.size() / 1e6;
  std::printf("[ speed    ] encoded %.2f MB into %zu tokens in %.3f s: %.1f MB/s (cold cache)\n",
              mb, ids->size(), secs, mb / secs);
  auto t1 = std::chrono::steady_clock::now();
  auto again = (*fresh)->Encode(text);
  double warm = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *ids);
  std::printf("[ speed    ] %.1f MB/s with a warm cache\n", mb / warm);
  if (is_wiki) {
    std::ifstream in(testing::FixturePath("tokenizer/smollm2_corpus.jsonl"));
    std::string line;
    ASSERT_TRUE(std::getline(in, line));
    const json meta = json::parse(line)["meta"];
    if (meta["wikitext_test_bytes"].get<size_t>() == text.size()) {
      // The whole split as one string, identical to HF's ids (compared through a hash).
      EXPECT_EQ(ids->size(), meta["wikitext_test_n_ids"].get<size_t>());
      EXPECT_EQ(Fnv1a64(*ids), meta["wikitext_test_ids_fnv1a64"].get<std::string>());
    } else {
      ADD_FAILURE() << wiki << " is not the file the fixture was made from";
    }
  }
  // Generous bound for a shared machine: a megabyte must take well under a few seconds.
  EXPECT_LT(secs / mb, 2.0);
  auto back = tok_->Decode(*ids);
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(*back == text) << "decode(encode(text)) differs";
  // Streaming decode yields the same text.
  StreamDecoder stream(*tok_);
  std::string streamed;
  for (int32_t id : *ids) {
    auto chunk = stream.Push(id);
    ASSERT_TRUE(chunk.ok());
    streamed += *chunk;
  }
  streamed += stream.Flush();
  EXPECT_TRUE(streamed == text) << "streamed decode differs";
}

}  // namespace
}  // namespace quantkv
