// The continuous-batching scheduler: token budget, decode-first order, chunked prefill,
// admission by free blocks, block return on finish and cancel, preemption by recompute,
// priority and FCFS order, the bounded queue, every INVALID_ARGUMENT of Submit and Commit,
// elastic pools that requantize before preempting, and a long randomized simulation (with
// and without an elastic pool) that checks the block and plan invariants every step.
#include "runtime/serve/scheduler.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace quantkv {
namespace {

// gtest only (no gmock in the test link line).
::testing::AssertionResult MentionsField(const absl::Status& st, const std::string& field) {
  if (std::string(st.message()).find(field) != std::string::npos) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "'" << st.message() << "' does not name " << field;
}

struct OnePool {
  int32_t n_blocks = 64;
  int64_t block_tokens = 4;
  int64_t max_step_tokens = 32;
  int64_t max_running = 8;
  int64_t max_queued = 16;
  int64_t max_context = 1024;
};

std::unique_ptr<Scheduler> Make(const OnePool& o) {
  SchedulerConfig c;
  c.pools = {{.name = "q4", .n_blocks = o.n_blocks, .block_tokens = o.block_tokens}};
  c.max_step_tokens = o.max_step_tokens;
  c.max_running = o.max_running;
  c.max_queued = o.max_queued;
  c.max_context = o.max_context;
  absl::StatusOr<std::unique_ptr<Scheduler>> s = Scheduler::Create(c);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

RequestSpec Req(uint64_t id, int64_t prompt, int64_t max_new, int priority = 0) {
  return {.id = id,
          .pool = 0,
          .prompt_tokens = prompt,
          .max_new_tokens = max_new,
          .priority = priority};
}

// One result per sampling item; ids in `finish` report a stop.
std::vector<SeqResult> Results(const StepPlan& plan, const std::vector<uint64_t>& finish = {}) {
  std::vector<SeqResult> r;
  for (const SeqWork& w : plan.items) {
    if (!w.samples) continue;
    r.push_back(
        {.id = w.id, .finished = std::find(finish.begin(), finish.end(), w.id) != finish.end()});
  }
  return r;
}

// Schedules and commits one step; returns the plan.
StepPlan Step(Scheduler& s, const std::vector<uint64_t>& finish = {}) {
  StepPlan plan = s.Schedule();
  absl::Status st = s.Commit(plan, Results(plan, finish));
  EXPECT_TRUE(st.ok()) << st;
  return plan;
}

const SeqWork* ItemFor(const StepPlan& plan, uint64_t id) {
  for (const SeqWork& w : plan.items) {
    if (w.id == id) return &w;
  }
  return nullptr;
}

int64_t FreeBlocks(const Scheduler& s) { return s.Stats().pools[0].blocks_free; }

TEST(SchedulerTest, TokenBudgetIsRespectedAndFilledByPrefill) {
  auto s = Make({.max_step_tokens = 16});
  for (uint64_t id = 1; id <= 5; ++id) ASSERT_TRUE(s->Submit(Req(id, 10, 4)).ok());
  StepPlan p = s->Schedule();
  // Request 1 whole, request 2 gets the remaining 6 as a first chunk; nobody else fits.
  ASSERT_EQ(p.items.size(), 2u);
  EXPECT_EQ(p.items[0].id, 1u);
  EXPECT_EQ(p.items[0].n_tokens, 10);
  EXPECT_TRUE(p.items[0].samples);
  EXPECT_EQ(p.items[1].id, 2u);
  EXPECT_EQ(p.items[1].n_tokens, 6);
  EXPECT_FALSE(p.items[1].samples);
  EXPECT_EQ(p.total_tokens(), 16);
  ASSERT_TRUE(s->Commit(p, Results(p)).ok());
  for (int i = 0; i < 40 && !s->idle(); ++i) {
    StepPlan q = Step(*s);
    EXPECT_LE(q.total_tokens(), 16);
    EXPECT_GT(q.total_tokens(), 0);
  }
  EXPECT_TRUE(s->idle());
  EXPECT_EQ(s->Stats().finished, 5);
}

TEST(SchedulerTest, DecodesComeFirstThenPrefill) {
  auto s = Make({.max_step_tokens = 8});
  ASSERT_TRUE(s->Submit(Req(1, 4, 10)).ok());
  ASSERT_TRUE(s->Submit(Req(2, 3, 10)).ok());
  Step(*s);  // both prefill whole (4 + 3 <= 8)
  ASSERT_TRUE(s->Submit(Req(3, 100, 10)).ok());
  StepPlan p = Step(*s);
  ASSERT_EQ(p.items.size(), 3u);
  EXPECT_EQ(p.items[0].id, 1u);
  EXPECT_FALSE(p.items[0].prefill);
  EXPECT_EQ(p.items[0].n_tokens, 1);
  EXPECT_EQ(p.items[0].start_pos, 4);
  EXPECT_EQ(p.items[1].id, 2u);
  EXPECT_FALSE(p.items[1].prefill);
  EXPECT_EQ(p.items[1].start_pos, 3);
  EXPECT_EQ(p.items[2].id, 3u);
  EXPECT_TRUE(p.items[2].prefill);
  EXPECT_EQ(p.items[2].n_tokens, 6);  // what the two decodes left of the budget
}

TEST(SchedulerTest, ChunkedPrefillAcrossStepsWithStartPositions) {
  auto s = Make({.max_step_tokens = 16});
  ASSERT_TRUE(s->Submit(Req(7, 50, 3)).ok());
  const int64_t expect_start[] = {0, 16, 32, 48};
  const int64_t expect_n[] = {16, 16, 16, 2};
  for (int i = 0; i < 4; ++i) {
    StepPlan p = Step(*s);
    ASSERT_EQ(p.items.size(), 1u);
    EXPECT_TRUE(p.items[0].prefill);
    EXPECT_EQ(p.items[0].start_pos, expect_start[i]);
    EXPECT_EQ(p.items[0].n_tokens, expect_n[i]);
    EXPECT_EQ(p.items[0].samples, i == 3);
    EXPECT_EQ(s->Find(7)->computed_tokens, expect_start[i] + expect_n[i]);
    EXPECT_EQ(s->Find(7)->generated_tokens, i == 3 ? 1 : 0);
  }
  StepPlan d = Step(*s);
  ASSERT_EQ(d.items.size(), 1u);
  EXPECT_FALSE(d.items[0].prefill);
  EXPECT_EQ(d.items[0].start_pos, 50);
  EXPECT_EQ(s->Find(7)->generated_tokens, 2);
  // The whole prefill was reserved up front: 50 tokens in blocks of 4, then one for 51.
  EXPECT_EQ(s->Find(7)->blocks, 13);
  Step(*s);  // third token: max_new_tokens reached, finished by the scheduler itself
  EXPECT_EQ(s->Find(7), nullptr);
  EXPECT_EQ(s->Stats().finished, 1);
  EXPECT_EQ(FreeBlocks(*s), 64);
}

TEST(SchedulerTest, AdmissionWaitsForFreeBlocksThenAdmits) {
  auto s = Make({.n_blocks = 10, .block_tokens = 4, .max_step_tokens = 64});
  ASSERT_TRUE(s->Submit(Req(1, 24, 5)).ok());  // 6 blocks
  ASSERT_TRUE(s->Submit(Req(2, 20, 5)).ok());  // 5 blocks: does not fit next to 1
  ASSERT_TRUE(s->Submit(Req(3, 4, 5)).ok());   // 1 block: would fit, but waits behind 2
  StepPlan p = Step(*s);
  ASSERT_EQ(p.items.size(), 1u);
  EXPECT_EQ(p.items[0].id, 1u);
  EXPECT_EQ(FreeBlocks(*s), 4);
  EXPECT_EQ(s->Stats().queued, 2);
  EXPECT_EQ(s->Find(2)->status, SeqStatus::kQueued);
  p = Step(*s, /*finish=*/{1});  // decode of 1 needs a 7th block, then 1 stops
  EXPECT_EQ(ItemFor(p, 2), nullptr);
  EXPECT_EQ(FreeBlocks(*s), 10);
  p = Step(*s);
  ASSERT_NE(ItemFor(p, 2), nullptr);
  ASSERT_NE(ItemFor(p, 3), nullptr);
  EXPECT_EQ(ItemFor(p, 2)->n_tokens, 20);
  EXPECT_EQ(FreeBlocks(*s), 10 - 5 - 1);
}

TEST(SchedulerTest, BlocksReturnExactlyOnFinishAndCancel) {
  auto s = Make({.n_blocks = 20, .block_tokens = 4, .max_step_tokens = 64});
  ASSERT_TRUE(s->Submit(Req(1, 9, 10)).ok());  // 3 blocks
  ASSERT_TRUE(s->Submit(Req(2, 8, 10)).ok());  // 2 blocks
  Step(*s);
  EXPECT_EQ(FreeBlocks(*s), 15);
  Step(*s);  // 1 writes token 10 (still 3 blocks), 2 writes token 9 (a 3rd block)
  EXPECT_EQ(s->Find(1)->blocks, 3);
  EXPECT_EQ(s->Find(2)->blocks, 3);
  EXPECT_EQ(FreeBlocks(*s), 14);
  Step(*s, /*finish=*/{2});
  EXPECT_EQ(s->Find(2), nullptr);
  EXPECT_EQ(FreeBlocks(*s), 17);
  ASSERT_TRUE(s->Cancel(1).ok());
  EXPECT_EQ(FreeBlocks(*s), 20);
  EXPECT_EQ(s->Stats().running, 0);
  EXPECT_EQ(s->Cancel(1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s->Cancel(99).code(), absl::StatusCode::kNotFound);

  // Cancel of a queued request frees nothing; cancel within an outstanding plan frees at
  // once and that plan still commits, without a result for the cancelled one.
  ASSERT_TRUE(s->Submit(Req(3, 40, 4)).ok());  // 10 blocks
  ASSERT_TRUE(s->Submit(Req(4, 60, 4)).ok());  // 15 blocks: queued behind 3
  StepPlan p = s->Schedule();
  EXPECT_EQ(FreeBlocks(*s), 10);
  ASSERT_TRUE(s->Cancel(4).ok());
  EXPECT_EQ(FreeBlocks(*s), 10);
  ASSERT_TRUE(s->Cancel(3).ok());
  EXPECT_EQ(FreeBlocks(*s), 20);
  EXPECT_EQ(s->Schedule().items.size(), 0u);  // the outstanding plan, less the cancelled
  EXPECT_TRUE(s->Commit(p, {}).ok());
  EXPECT_FALSE(s->has_outstanding_plan());
  EXPECT_EQ(s->Stats().cancelled, 3);
  EXPECT_TRUE(s->idle());
}

TEST(SchedulerTest, DecodeOutOfBlocksPreemptsNewestWhichRecomputes) {
  auto s = Make({.n_blocks = 6, .block_tokens = 4, .max_step_tokens = 32});
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(s->Submit(Req(id, 8, 12)).ok());
  Step(*s);  // each holds 2 blocks of 8 tokens, 1 token generated
  EXPECT_EQ(FreeBlocks(*s), 0);
  ASSERT_TRUE(s->Submit(Req(4, 4, 20)).ok());  // same priority, arrives after
  // Every decode needs a 3rd block now.
  StepPlan p = Step(*s);
  EXPECT_EQ(p.preempted, std::vector<uint64_t>({3}));
  ASSERT_EQ(p.items.size(), 2u);  // no admission in a step that preempted
  EXPECT_EQ(p.items[0].id, 1u);
  EXPECT_EQ(p.items[1].id, 2u);
  EXPECT_EQ(s->Stats().preemptions, 1);
  EXPECT_EQ(FreeBlocks(*s), 0);
  const SeqState* three = s->Find(3);
  ASSERT_NE(three, nullptr);
  EXPECT_EQ(three->status, SeqStatus::kQueued);
  EXPECT_EQ(three->blocks, 0);
  EXPECT_EQ(three->generated_tokens, 1);
  EXPECT_EQ(three->prefill_tokens, 9);  // prompt 8 + 1 generated

  p = Step(*s, /*finish=*/{1});  // frees 3 blocks, enough for 9 tokens
  p = Step(*s);
  const SeqWork* w = ItemFor(p, 3);
  ASSERT_NE(w, nullptr);  // back at the front: admitted before 4
  EXPECT_TRUE(w->prefill);
  EXPECT_EQ(w->start_pos, 0);
  EXPECT_EQ(w->n_tokens, 9);
  EXPECT_TRUE(w->samples);
  EXPECT_EQ(ItemFor(p, 4), nullptr);
  EXPECT_EQ(s->Find(3)->generated_tokens, 2);
  EXPECT_EQ(s->Find(3)->computed_tokens, 9);
}

// Runs 2 requests of prompt 8, 12 new tokens to the end on 6 blocks of 4 tokens (each needs 5
// at the end, 3 once two pairs are requantized); returns
// the preemptions and checks every plan's requantizations against the blocks they free.
int64_t RunPressuredLoad(bool elastic, int64_t* requantized_blocks) {
  SchedulerConfig c;
  c.pools = {{.name = "q4", .n_blocks = 6, .block_tokens = 4, .elastic = elastic}};
  c.max_step_tokens = 32;
  c.max_running = 8;
  auto s = Scheduler::Create(c);
  EXPECT_TRUE(s.ok()) << s.status();
  for (uint64_t id = 1; id <= 2; ++id) EXPECT_TRUE((*s)->Submit(Req(id, 8, 12)).ok());
  absl::flat_hash_map<uint64_t, int64_t> floor;  // blocks requantized per sequence
  for (int step = 0; step < 200 && !(*s)->idle(); ++step) {
    StepPlan plan = (*s)->Schedule();
    for (uint64_t id : plan.preempted) floor.erase(id);
    for (const SeqRequantize& r : plan.requantize) {
      const SeqState* st = (*s)->Find(r.id);
      EXPECT_NE(st, nullptr);
      if (st == nullptr) continue;
      EXPECT_EQ(st->status, SeqStatus::kRunning);
      floor[r.id] += 2 * r.pairs;
      EXPECT_EQ(st->floor_blocks, floor[r.id]);
      // Only written blocks: the engine can re-encode what is encoded.
      EXPECT_LE(st->floor_blocks, st->computed_tokens / 4) << "sequence " << r.id;
    }
    EXPECT_TRUE(elastic || plan.requantize.empty());
    EXPECT_TRUE((*s)->Commit(plan, Results(plan)).ok());
  }
  EXPECT_TRUE((*s)->idle()) << "the load did not finish";
  EXPECT_EQ((*s)->Stats().pools[0].blocks_free, 6) << "blocks leaked";
  *requantized_blocks = (*s)->Stats().requantized_blocks;
  return (*s)->Stats().preemptions;
}

TEST(SchedulerTest, ElasticPoolRequantizesOldBlocksInsteadOfPreempting) {
  int64_t requantized = 0;
  EXPECT_GT(RunPressuredLoad(/*elastic=*/false, &requantized), 0);
  EXPECT_EQ(requantized, 0);
  EXPECT_EQ(RunPressuredLoad(/*elastic=*/true, &requantized), 0);
  EXPECT_GT(requantized, 0);
  EXPECT_EQ(requantized % 2, 0);
}

TEST(SchedulerTest, DecodePreemptsItselfWhenNothingNewerIsLeft) {
  auto s = Make({.n_blocks = 5, .block_tokens = 4, .max_step_tokens = 32});
  ASSERT_TRUE(s->Submit(Req(1, 8, 10)).ok());
  ASSERT_TRUE(s->Submit(Req(2, 8, 10)).ok());
  Step(*s);
  StepPlan p = Step(*s);  // 1 takes the last block; 2 is the newest and gives way
  ASSERT_EQ(p.items.size(), 1u);
  EXPECT_EQ(p.items[0].id, 1u);
  EXPECT_EQ(p.preempted, std::vector<uint64_t>({2}));
  EXPECT_EQ(s->Find(1)->blocks, 3);
  EXPECT_EQ(s->Find(2)->blocks, 0);
  EXPECT_EQ(FreeBlocks(*s), 2);
}

TEST(SchedulerTest, PriorityThenFirstComeFirstServed) {
  auto s = Make({.max_step_tokens = 64, .max_running = 1});
  ASSERT_TRUE(s->Submit(Req(1, 4, 1, /*priority=*/0)).ok());
  ASSERT_TRUE(s->Submit(Req(2, 4, 1, /*priority=*/1)).ok());
  ASSERT_TRUE(s->Submit(Req(3, 4, 1, /*priority=*/0)).ok());
  ASSERT_TRUE(s->Submit(Req(4, 4, 1, /*priority=*/1)).ok());
  ASSERT_TRUE(s->Submit(Req(5, 4, 1, /*priority=*/-2)).ok());
  ASSERT_TRUE(s->Submit(Req(6, 4, 1, /*priority=*/0)).ok());
  std::vector<uint64_t> order;
  while (!s->idle()) {
    StepPlan p = Step(*s);
    ASSERT_EQ(p.items.size(), 1u);  // max_running = 1 and max_new_tokens = 1
    order.push_back(p.items[0].id);
  }
  EXPECT_EQ(order, std::vector<uint64_t>({2, 4, 1, 3, 6, 5}));
}

TEST(SchedulerTest, BoundedQueueIsResourceExhausted) {
  auto s = Make({.max_running = 1, .max_queued = 2});
  ASSERT_TRUE(s->Submit(Req(1, 4, 5)).ok());
  ASSERT_TRUE(s->Submit(Req(2, 4, 5)).ok());
  absl::Status st = s->Submit(Req(3, 4, 5));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(MentionsField(st, "max_queued"));
  EXPECT_EQ(s->Find(3), nullptr);
  Step(*s);  // admits 1: one slot in the queue again
  EXPECT_TRUE(s->Submit(Req(3, 4, 5)).ok());
  EXPECT_EQ(s->Submit(Req(4, 4, 5)).code(), absl::StatusCode::kResourceExhausted);
}

void ExpectInvalid(Scheduler& s, const RequestSpec& r, const std::string& field) {
  absl::Status st = s.Submit(r);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field << ": " << st;
  EXPECT_TRUE(MentionsField(st, field));
  EXPECT_EQ(s.Stats().queued, 1);  // only the valid request 1
}

TEST(SchedulerTest, SubmitRejectsEachInvalidRequestNamingTheField) {
  auto s = Make({.n_blocks = 8, .block_tokens = 4, .max_context = 100});
  ASSERT_TRUE(s->Submit(Req(1, 4, 4)).ok());
  RequestSpec r = Req(2, 4, 4);
  r.pool = 1;
  ExpectInvalid(*s, r, "pool");
  r.pool = -1;
  ExpectInvalid(*s, r, "pool");
  ExpectInvalid(*s, Req(2, 0, 4), "prompt_tokens");
  ExpectInvalid(*s, Req(2, -3, 4), "prompt_tokens");
  ExpectInvalid(*s, Req(2, 4, 0), "max_new_tokens");
  ExpectInvalid(*s, Req(2, 90, 11), "max_context");
  // 8 blocks of 4 hold 32 tokens: prompt 20 + 13 new writes 32 tokens (fits), + 14 does not.
  ExpectInvalid(*s, Req(2, 20, 14), "n_blocks");
  ExpectInvalid(*s, Req(1, 4, 4), "id");
  EXPECT_EQ(s->Find(1)->spec.prompt_tokens, 4);
  EXPECT_TRUE(s->Submit(Req(5, 20, 13)).ok());  // the largest that fits is accepted
}

TEST(SchedulerTest, CreateRejectsBadConfigs) {
  SchedulerConfig good;
  good.pools = {{.name = "a", .n_blocks = 4, .block_tokens = 16}};
  good.max_step_tokens = 8;
  good.max_running = 8;
  EXPECT_TRUE(Scheduler::Create(good).ok());
  auto expect_bad = [](SchedulerConfig c, const std::string& field) {
    absl::StatusOr<std::unique_ptr<Scheduler>> s = Scheduler::Create(c);
    ASSERT_FALSE(s.ok()) << field;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(MentionsField(s.status(), field));
  };
  SchedulerConfig c = good;
  c.pools.clear();
  expect_bad(c, "pools");
  c = good;
  c.pools[0].n_blocks = 0;
  expect_bad(c, "n_blocks");
  c = good;
  c.pools[0].block_tokens = 0;
  expect_bad(c, "block_tokens");
  c = good;
  c.pools.push_back(c.pools[0]);
  expect_bad(c, "name");
  c = good;
  c.max_step_tokens = 7;
  expect_bad(c, "max_step_tokens");
  c = good;
  c.max_queued = 0;
  expect_bad(c, "max_queued");
  c = good;
  c.max_context = 0;
  expect_bad(c, "max_context");
}

TEST(SchedulerTest, CommitRejectsMismatchedResultsAndChangesNothing) {
  auto s = Make({.max_step_tokens = 16});
  ASSERT_TRUE(s->Submit(Req(1, 4, 5)).ok());
  ASSERT_TRUE(s->Submit(Req(2, 30, 5)).ok());
  StepPlan p = s->Schedule();  // 1 samples; 2 gets a non-sampling chunk of 12
  ASSERT_EQ(p.items.size(), 2u);
  ASSERT_FALSE(p.items[1].samples);
  const int64_t free_before = FreeBlocks(*s);
  auto unchanged = [&] {
    EXPECT_EQ(s->Find(1)->computed_tokens, 0);
    EXPECT_EQ(s->Find(1)->generated_tokens, 0);
    EXPECT_EQ(s->Find(2)->computed_tokens, 0);
    EXPECT_EQ(FreeBlocks(*s), free_before);
    EXPECT_TRUE(s->has_outstanding_plan());
  };
  const std::vector<std::vector<SeqResult>> bad = {
      {},                             // missing result for 1
      {{.id = 1}, {.id = 1}},         // duplicate
      {{.id = 1}, {.id = 2}},         // 2 did not sample
      {{.id = 1}, {.id = 9}},         // unknown id
      {{.id = 2, .finished = true}},  // wrong id only
  };
  for (const auto& r : bad) {
    EXPECT_EQ(s->Commit(p, r).code(), absl::StatusCode::kInvalidArgument);
    unchanged();
  }
  StepPlan other = p;
  other.step += 1;
  EXPECT_EQ(s->Commit(other, Results(p)).code(), absl::StatusCode::kInvalidArgument);
  unchanged();
  // Schedule before Commit hands back the same plan.
  StepPlan again = s->Schedule();
  EXPECT_EQ(again.step, p.step);
  EXPECT_EQ(again.items.size(), p.items.size());
  ASSERT_TRUE(s->Commit(p, Results(p)).ok());
  EXPECT_EQ(s->Find(1)->computed_tokens, 4);
  EXPECT_EQ(s->Find(1)->generated_tokens, 1);
  EXPECT_EQ(s->Find(2)->computed_tokens, 12);
  EXPECT_EQ(s->Commit(p, Results(p)).code(), absl::StatusCode::kInvalidArgument);  // twice
}

// What the simulated engine knows of one live request.
struct Tracked {
  RequestSpec spec;
  int64_t generated = 0;
};

void RunSimulation(uint32_t seed, bool elastic) {
  SchedulerConfig c;
  c.pools = {{.name = "q4", .n_blocks = 40, .block_tokens = 16},
             {.name = "q8", .n_blocks = 12, .block_tokens = 8, .elastic = elastic}};
  c.max_step_tokens = 64;
  c.max_running = 10;
  c.max_queued = 24;
  c.max_context = 400;
  auto made = Scheduler::Create(c);
  ASSERT_TRUE(made.ok()) << made.status();
  Scheduler& s = **made;
  std::mt19937 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  absl::flat_hash_map<uint64_t, Tracked> live;
  uint64_t next_id = 1;
  int64_t submitted = 0, ended_by_us = 0, reached_max = 0;
  const int kArrivalSteps = 4000;
  int step = 0;
  for (; step < kArrivalSteps || !live.empty(); ++step) {
    ASSERT_LT(step, kArrivalSteps + 20000) << "did not drain; seed " << seed;
    if (step < kArrivalSteps && uniform(0, 99) < 45) {
      RequestSpec r{.id = next_id++,
                    .pool = static_cast<int>(uniform(0, 1)),
                    .prompt_tokens = uniform(1, 150),
                    .max_new_tokens = uniform(1, 60),
                    .priority = static_cast<int>(uniform(0, 2))};
      absl::Status st = s.Submit(r);
      const int64_t peak = s.BlocksFor(r.pool, r.prompt_tokens + r.max_new_tokens - 1);
      if (st.ok()) {
        live[r.id] = {.spec = r};
        ++submitted;
      } else if (st.code() == absl::StatusCode::kInvalidArgument) {
        ASSERT_GT(peak, c.pools[r.pool].n_blocks) << st;  // the only way these can fail
      } else {
        ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
        ASSERT_GE(s.Stats().queued, c.max_queued);
      }
    }
    if (!live.empty() && uniform(0, 99) < 3) {  // a client goes away
      auto it = std::next(live.begin(), uniform(0, live.size() - 1));
      ASSERT_TRUE(s.Cancel(it->first).ok());
      live.erase(it);
      ++ended_by_us;
    }

    StepPlan plan = s.Schedule();
    ASSERT_LE(plan.total_tokens(), c.max_step_tokens);
    absl::flat_hash_set<uint64_t> seen;
    bool prefill_seen = false;
    for (const SeqWork& w : plan.items) {
      ASSERT_TRUE(seen.insert(w.id).second) << "scheduled twice: " << w.id;
      ASSERT_GT(w.n_tokens, 0);
      ASSERT_FALSE(!w.prefill && prefill_seen) << "decode after a prefill";
      prefill_seen |= w.prefill;
      const SeqState* st = s.Find(w.id);
      ASSERT_NE(st, nullptr);
      ASSERT_EQ(st->status, SeqStatus::kRunning);
      ASSERT_EQ(st->spec.pool, w.pool);
      ASSERT_EQ(st->computed_tokens, w.start_pos);
      const Tracked& t = live.at(w.id);
      if (w.prefill) {
        // A (re)computed prefill covers the prompt and everything generated so far.
        ASSERT_EQ(st->prefill_tokens, t.spec.prompt_tokens + t.generated);
        ASSERT_LE(w.start_pos + w.n_tokens, st->prefill_tokens);
        ASSERT_EQ(w.samples, w.start_pos + w.n_tokens == st->prefill_tokens);
      } else {
        ASSERT_EQ(w.n_tokens, 1);
        ASSERT_EQ(w.start_pos, t.spec.prompt_tokens + t.generated - 1);
      }
      // The engine's KvCache::Reserve(start + n) needs floor((start + n) / bt) logical blocks;
      // a requantized pair is two of them in one held block.
      ASSERT_GE((st->blocks + st->floor_blocks / 2) * c.pools[w.pool].block_tokens,
                w.start_pos + w.n_tokens);
    }
    for (const SeqRequantize& q : plan.requantize) {
      const SeqState* st = s.Find(q.id);
      ASSERT_NE(st, nullptr);
      ASSERT_EQ(st->status, SeqStatus::kRunning);
      ASSERT_TRUE(c.pools[st->spec.pool].elastic);
      ASSERT_GT(q.pairs, 0);
      ASSERT_EQ(st->floor_blocks % 2, 0);
      // Only written blocks can be re-encoded.
      ASSERT_LE(st->floor_blocks, st->computed_tokens / c.pools[st->spec.pool].block_tokens);
    }
    for (uint64_t id : plan.preempted) {
      ASSERT_FALSE(seen.contains(id)) << "preempted and scheduled: " << id;
      const SeqState* st = s.Find(id);
      ASSERT_NE(st, nullptr);
      ASSERT_EQ(st->status, SeqStatus::kQueued);
      ASSERT_EQ(st->blocks, 0);
    }

    // Sometimes a request is cancelled while its step runs.
    if (!plan.items.empty() && uniform(0, 99) < 2) {
      const uint64_t id = plan.items[uniform(0, plan.items.size() - 1)].id;
      ASSERT_TRUE(s.Cancel(id).ok());
      live.erase(id);
      ++ended_by_us;
    }
    std::vector<SeqResult> results;
    std::vector<uint64_t> sampled;
    for (const SeqWork& w : plan.items) {
      if (!w.samples || !live.contains(w.id)) continue;
      const bool stop = uniform(0, 99) < 4;  // a stop token
      results.push_back({.id = w.id, .finished = stop});
      sampled.push_back(w.id);
    }
    std::shuffle(results.begin(), results.end(), rng);  // order must not matter
    ASSERT_TRUE(s.Commit(plan, results).ok()) << "step " << step;
    for (const SeqResult& r : results) {
      Tracked& t = live.at(r.id);
      ++t.generated;
      ASSERT_LE(t.generated, t.spec.max_new_tokens);
      const bool gone = s.Find(r.id) == nullptr;
      ASSERT_EQ(gone, r.finished || t.generated == t.spec.max_new_tokens) << r.id;
      if (gone) {
        reached_max += !r.finished;
        ++ended_by_us;
        live.erase(r.id);
      }
    }

    // Block accounting: used == sum of what live running sequences hold, within the pool.
    SchedulerStats stats = s.Stats();
    std::vector<int64_t> held(c.pools.size(), 0);
    int64_t running = 0, queued = 0;
    for (const auto& [id, t] : live) {
      const SeqState* st = s.Find(id);
      ASSERT_NE(st, nullptr) << "live request " << id << " vanished";
      ASSERT_EQ(st->generated_tokens, t.generated);
      if (st->status == SeqStatus::kRunning) {
        ++running;
        held[st->spec.pool] += st->blocks;
        const int64_t tokens = std::max(st->prefill_tokens, st->computed_tokens);
        ASSERT_EQ(st->blocks + st->floor_blocks / 2, s.BlocksFor(st->spec.pool, tokens));
      } else {
        ++queued;
        ASSERT_EQ(st->blocks, 0);
      }
    }
    ASSERT_EQ(stats.running, running);
    ASSERT_LE(stats.running, c.max_running);
    ASSERT_EQ(stats.queued, queued);
    for (size_t p = 0; p < c.pools.size(); ++p) {
      ASSERT_EQ(stats.pools[p].blocks_used, held[p]) << "pool " << p << " step " << step;
      ASSERT_LE(stats.pools[p].blocks_used, c.pools[p].n_blocks);
      ASSERT_EQ(stats.pools[p].blocks_used + stats.pools[p].blocks_free, c.pools[p].n_blocks);
    }
  }
  SchedulerStats end = s.Stats();
  EXPECT_TRUE(s.idle());
  EXPECT_EQ(end.finished + end.cancelled, submitted);
  EXPECT_EQ(ended_by_us, submitted);
  EXPECT_EQ(end.pools[0].blocks_used, 0);
  EXPECT_EQ(end.pools[1].blocks_used, 0);
  // The run must have exercised the interesting paths, or it proves little.
  if (elastic) {  // preemption is rarer there (requantization comes first) but still occurs
    EXPECT_GT(end.requantized_blocks, 100) << "seed " << seed;
    EXPECT_GT(end.preemptions, 0) << "seed " << seed;
  } else {
    EXPECT_GT(end.preemptions, 20) << "seed " << seed;
    EXPECT_EQ(end.requantized_blocks, 0);
  }
  EXPECT_GT(reached_max, 20);
  EXPECT_GT(end.cancelled, 20);
  std::printf(
      "seed %u%s: %d steps, %lld submitted, %lld preemptions, %lld requantized, %lld cancelled\n",
      seed, elastic ? " (elastic q8 pool)" : "", step, static_cast<long long>(submitted),
      static_cast<long long>(end.preemptions), static_cast<long long>(end.requantized_blocks),
      static_cast<long long>(end.cancelled));
}

TEST(SchedulerTest, RandomizedSimulationKeepsInvariants) {
  for (bool elastic : {false, true}) {
    for (uint32_t seed : {1u, 2u, 12345u}) {
      RunSimulation(seed, elastic);
      if (HasFatalFailure()) return;
    }
  }
}

}  // namespace
}  // namespace quantkv
